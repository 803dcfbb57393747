use std::future::poll_fn;

use http_body_util::{BodyExt, Full, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

fn connection() -> (HttpConnection, DuplexStream) {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let connection = HttpConnection::new(Io::Memory(ours));
    (connection, theirs)
}

fn host_headers() -> Vec<(HeaderName, HeaderValue)> {
    vec![(
        HeaderName::from_static("x-user-id"),
        HeaderValue::from_static("alice"),
    )]
}

/// Sends a GET (or `method`) and answers it with `response`; the head, and the body as read.
async fn exchange(
    method: Method,
    response: &[u8],
    close_after: bool,
) -> (
    HttpConnection,
    Result<ResponseHead, H1Error>,
    Vec<u8>,
    Option<H1Error>,
) {
    let (mut connection, mut upstream) = connection();
    connection.start(&method, "/api/x?a=1", "core:80", &host_headers(), None);
    let mut request = vec![0u8; 4096];
    let head = {
        let answer = async {
            let n = upstream.read(&mut request).await.unwrap();
            upstream.write_all(response).await.unwrap();
            if close_after {
                upstream.shutdown().await.unwrap();
            }
            n
        };
        let (head, _) = tokio::join!(poll_fn(|cx| connection.poll_head(cx)), answer);
        head
    };
    let mut body = Vec::new();
    let mut failed = None;
    if head.is_ok() {
        loop {
            match poll_fn(|cx| connection.poll_body(cx)).await {
                Some(Ok(piece)) => body.extend_from_slice(&piece),
                Some(Err(error)) => {
                    failed = Some(error);
                    break;
                }
                None => break,
            }
        }
    }
    drop(upstream);
    (connection, head, body, failed)
}

#[tokio::test]
async fn the_request_head_is_written_from_the_shaped_headers() {
    let (mut connection, mut upstream) = connection();
    let body = Full::new(Bytes::from_static(b"hello"))
        .map_err(|never| match never {})
        .boxed_unsync();
    connection.start(
        &Method::POST,
        "/api/echo",
        "core:80",
        &host_headers(),
        Some((body, Some(5))),
    );
    let answer = async {
        let mut seen = vec![0u8; 4096];
        let n = upstream.read(&mut seen).await.unwrap();
        upstream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&seen[..n]).into_owned()
    };
    let (head, seen) = tokio::join!(poll_fn(|cx| connection.poll_head(cx)), answer);
    assert_eq!(head.unwrap().status, 200);
    assert_eq!(
        seen,
        "POST /api/echo HTTP/1.1\r\nhost: core:80\r\nx-user-id: alice\r\ncontent-length: 5\r\n\r\nhello"
    );
    assert!(connection.reusable());
}

#[tokio::test]
async fn a_body_of_unknown_length_goes_chunked() {
    let (mut connection, mut upstream) = connection();
    let pieces = futures_util::stream::iter([
        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"abc"))),
        Ok(hyper::body::Frame::data(Bytes::from_static(
            b"0123456789abcdef",
        ))),
    ]);
    let body = StreamBody::new(pieces).boxed_unsync();
    connection.start(&Method::PUT, "/u", "core", &[], Some((body, None)));
    let answer = async {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 1024];
        while !seen.ends_with(b"0\r\n\r\n") {
            let n = upstream.read(&mut buffer).await.unwrap();
            seen.extend_from_slice(&buffer[..n]);
        }
        upstream
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&seen).into_owned()
    };
    let (head, seen) = tokio::join!(poll_fn(|cx| connection.poll_head(cx)), answer);
    assert_eq!(head.unwrap().status, 204);
    assert!(
        seen.ends_with(
            "transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n"
        ),
        "{seen}"
    );
    assert!(connection.body_done() && connection.reusable());
}

#[tokio::test]
async fn response_bodies_are_framed_as_the_rfc_says() {
    // Chunked, with trailers: whole, and the connection can be used again.
    let (connection, head, body, failed) = exchange(
        Method::GET,
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n",
        false,
    )
    .await;
    let head = head.unwrap();
    assert_eq!(
        (body.as_slice(), failed.is_none()),
        (&b"hello world"[..], true)
    );
    assert!(head.headers.get("transfer-encoding").is_none());
    assert!(connection.reusable());

    // A length: the length's bytes; what comes after them makes the connection unusable.
    let (connection, _, body, _) = exchange(
        Method::GET,
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcEXTRA",
        false,
    )
    .await;
    assert_eq!(body, b"abc");
    assert!(!connection.reusable());

    // A HEAD's response has no body, and keeps its length.
    let (connection, head, body, _) = exchange(
        Method::HEAD,
        b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n",
        false,
    )
    .await;
    assert_eq!(head.unwrap().headers["content-length"], "1000");
    assert!(body.is_empty() && connection.reusable());

    // Informational responses are skipped; 304 has no body.
    let (_, head, body, _) = exchange(
        Method::GET,
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
        false,
    )
    .await;
    assert_eq!(head.unwrap().status, 304);
    assert!(body.is_empty());

    // No length and no coding: the body runs until the close, and ends as it should.
    let (connection, _, body, failed) =
        exchange(Method::GET, b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true).await;
    assert_eq!(
        (body.as_slice(), failed.is_none()),
        (&b"until the end"[..], true)
    );
    assert!(!connection.reusable());

    // Connection: close is honoured.
    let (connection, _, _, _) = exchange(
        Method::GET,
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        false,
    )
    .await;
    assert!(!connection.reusable());

    // A length and a coding: the coding frames the body; the connection is not reused.
    let (connection, _, body, _) = exchange(
        Method::GET,
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        false,
    )
    .await;
    assert_eq!(body, b"ok");
    assert!(!connection.reusable());
}

#[tokio::test]
async fn cut_and_malformed_responses_fail() {
    let (_, head, _, _) = exchange(Method::GET, b"", true).await;
    assert!(matches!(head, Err(H1Error::ClosedBeforeAnswer)));
    let (_, _, body, failed) = exchange(
        Method::GET,
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
        true,
    )
    .await;
    assert_eq!(body, b"abc");
    assert!(matches!(failed, Some(H1Error::ClosedInBody)));
    for bad in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"NOT HTTP\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        // A coding the edge would pass on undeclared, or chunked twice over.
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n",
    ] {
        let (_, head, _, _) = exchange(Method::GET, bad, true).await;
        assert!(
            matches!(head, Err(H1Error::Malformed(_))),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let (_, _, _, failed) = exchange(
        Method::GET,
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        true,
    )
    .await;
    assert!(matches!(failed, Some(H1Error::Chunked(_))));
}

#[tokio::test]
async fn an_answer_sent_before_the_upstream_closes_on_an_upload_is_read() {
    let (ours, mut upstream) = tokio::io::duplex(4 * 1024);
    let mut connection = HttpConnection::new(Io::Memory(ours));
    let body = Full::new(Bytes::from(vec![b'x'; 1024 * 1024]))
        .map_err(|never| match never {})
        .boxed_unsync();
    connection.start(
        &Method::POST,
        "/upload",
        "core",
        &[],
        Some((body, Some(1024 * 1024))),
    );
    let answer = async {
        let mut seen = [0u8; 1024];
        upstream.read_exact(&mut seen).await.unwrap();
        upstream
            .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nbig!")
            .await
            .unwrap();
        // Gone without reading the rest: the edge's next write fails.
        drop(upstream);
    };
    let (head, ()) = tokio::join!(poll_fn(|cx| connection.poll_head(cx)), answer);
    assert_eq!(head.unwrap().status, 413);
    let piece = poll_fn(|cx| connection.poll_body(cx)).await;
    assert_eq!(piece.unwrap().unwrap(), &b"big!"[..]);
    assert!(!connection.reusable());
}

#[test]
fn keep_alive_timeouts_are_read() {
    assert_eq!(
        keep_alive_timeout(b"timeout=5, max=1000"),
        Some(Duration::from_secs(5))
    );
    assert_eq!(
        keep_alive_timeout(b"max=10, Timeout = 2"),
        Some(Duration::from_secs(2))
    );
    assert_eq!(keep_alive_timeout(b"max=10"), None);
    assert_eq!(keep_alive_timeout(b"timeout=soon"), None);
}

#[test]
fn content_lengths_are_digits_only() {
    assert_eq!(parse_length(b"42"), Some(42));
    assert_eq!(parse_length(b"42, 42"), Some(42));
    for bad in [
        &b""[..],
        b"-1",
        b"+1",
        b"4 2",
        b"0x10",
        b"42, 43",
        b"99999999999999999999",
    ] {
        assert_eq!(
            parse_length(bad),
            None,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}
