//! HTTP next to the socket (`http = "proxy"`): REST calls, request and response bodies, SSE,
//! long-polls, CORS, affinity and request smuggling, through the edge to a real HTTP upstream,
//! with a real HTTP client, on loopback.

mod common;

use std::time::{Duration, Instant};

use common::plain::*;
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ROUTE: &str = "route=\"/api*\"";

/// An HTTP upstream and an edge proxying `/api/…` to it; `route` lines are added to the route.
async fn proxied(route: &str) -> (HttpUpstream, TestEdge) {
    proxied_with("", route).await
}

/// The same with `server` lines for `[server]`.
async fn proxied_with(server: &str, route: &str) -> (HttpUpstream, TestEdge) {
    let upstream = HttpUpstream::start("a").await;
    let config = EdgeConfig::new(&upstream.url("/api"))
        .server(server)
        .path("/api")
        .policy(r#"token_from = ["header", "query:token", "cookie:session"]"#)
        .route("match = \"prefix\"\nhttp = \"proxy\"")
        .route(route);
    let edge = TestEdge::start(&config.build()).await;
    (upstream, edge)
}

/// Upstream connections are pooled per event loop: with one, every client shares its pool.
const ONE_EVENT_LOOP: &str = "workers = 1";

fn alice() -> String {
    hs256(&claims(
        "alice",
        json!({ "tenant_id": "acme", "conversation_id": "c42" }),
    ))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Writes `request` on a fresh connection and reads until the edge closes it.
async fn raw_exchange(edge: &TestEdge, request: &str) -> String {
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("the edge closed the connection in time");
    String::from_utf8_lossy(&response).into_owned()
}

/// Header names and values of a request under test.
type Headers<'a> = Vec<(&'a str, &'a str)>;

#[tokio::test]
async fn a_rest_call_carries_the_identity_and_never_the_token_from_any_source() {
    let (mut upstream, edge) = proxied("").await;
    let token = alice();
    let authorization = bearer(&token);
    let cookie = format!("theme=dark; session={token}");
    let query_path = format!("/api/echo?x=1&token={token}");
    let sources: [(&str, &str, Headers); 3] = [
        (
            "header",
            "/api/echo?x=1",
            vec![("authorization", &authorization)],
        ),
        ("query", &query_path, vec![]),
        ("cookie", "/api/echo?x=1", vec![("cookie", &cookie)]),
    ];
    for (source, path, mut headers) in sources {
        // A forged identity, which the edge replaces.
        headers.push(("x-user-id", "mallory"));
        let mut client = HttpClient::connect(edge.addr).await;
        let response = client
            .fetch(request("POST", path, &headers, b"hello".to_vec()))
            .await;
        assert_eq!(response.status, 200, "{source}: {:?}", response.json());
        assert_eq!(response.body, b"hello", "{source}");
        assert!(response.header("x-request-id").is_some(), "{source}");
        assert_eq!(response.header("x-upstream"), Some("a"));
        // The upstream's hop-by-hop headers stay on its hop.
        assert_eq!(response.header("x-hop"), None, "{source}");
        let seen = upstream.next_request().await;
        let request = &seen.request;
        assert_eq!(seen.method, "POST");
        assert_eq!(request.path(), "/api/echo", "{source}");
        assert_eq!(request.header("x-user-id"), Some("alice"), "{source}");
        assert_eq!(request.header_all("x-user-id").len(), 1, "{source}");
        assert_eq!(request.header("x-tenant-id"), Some("acme"), "{source}");
        assert_eq!(request.header("x-conversation-id"), Some("c42"), "{source}");
        assert_eq!(request.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(request.header("x-forwarded-proto"), Some("http"));
        assert_eq!(
            request.header("x-request-id"),
            response.header("x-request-id"),
            "{source}"
        );
        assert_eq!(request.query_param("x").as_deref(), Some("1"), "{source}");
        assert_eq!(request.header("authorization"), None, "{source}");
        assert_eq!(request.query_param("token"), None, "{source}");
        if source == "cookie" {
            assert_eq!(request.header("cookie"), Some("theme=dark"));
        }
        assert!(
            !format!("{request:?}").contains(&token),
            "{source}: the token reached the upstream"
        );
    }
}

#[tokio::test]
async fn refusals_never_reach_the_upstream() {
    let (mut upstream, edge) = proxied("").await;
    let mut client = HttpClient::connect(edge.addr).await;
    let missing = client.fetch(get("/api/echo", &[])).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["error"], "token_missing");
    assert!(
        missing
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer"))
    );
    let mut client = HttpClient::connect(edge.addr).await;
    let forged = client
        .fetch(get(
            "/api/echo",
            &[("authorization", &bearer(&format!("{}x", alice())))],
        ))
        .await;
    assert_eq!(
        (forged.status, forged.json()["error"].as_str()),
        (401, Some("token_invalid"))
    );
    let mut client = HttpClient::connect(edge.addr).await;
    let nowhere = client.fetch(get("/elsewhere", &[])).await;
    assert_eq!(nowhere.status, 404);
    assert_eq!(upstream.requests_so_far(), 0);
    assert_eq!(
        upstream.accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a refused request opened a connection upstream"
    );
    edge.wait_metric(
        &format!("wsedge_http_requests_total{{{ROUTE},status=\"401\"}}"),
        2.0,
    )
    .await;
}

#[tokio::test]
async fn a_route_without_http_proxy_still_answers_plain_requests_with_426() {
    let upstream = Upstream::start().await;
    let edge = TestEdge::start(&EdgeConfig::new(&upstream.url("/ws")).build()).await;
    let mut client = HttpClient::connect(edge.addr).await;
    let response = client
        .fetch(get("/ws/chat", &[("authorization", &bearer(&alice()))]))
        .await;
    assert_eq!(
        (response.status, response.json()["error"].as_str()),
        (426, Some("upgrade_required"))
    );
}

#[tokio::test]
async fn bodies_of_256_kib_pass_intact_both_ways() {
    let (mut upstream, edge) = proxied("").await;
    let token = alice();
    let authorization = bearer(&token);
    let headers = [("authorization", authorization.as_str())];
    let sent = pattern(256 * 1024);
    let mut client = HttpClient::connect(edge.addr).await;
    let echoed = client
        .fetch(request("POST", "/api/echo", &headers, sent.clone()))
        .await;
    assert_eq!(echoed.status, 200);
    assert!(echoed.body == sent, "the echoed body differs");
    assert!(
        upstream.next_request().await.body == sent,
        "the upstream got another body"
    );
    let big = client.fetch(get("/api/big?bytes=262144", &headers)).await;
    assert_eq!(big.status, 200);
    assert!(big.body == pattern(256 * 1024), "the response body differs");
    // One client connection for both: the edge keeps it alive between requests.
    assert!(client.is_open());
}

#[tokio::test]
async fn a_body_past_max_body_size_gets_413() {
    let (mut upstream, edge) = proxied("max_body_size = \"64KiB\"").await;
    let authorization = bearer(&alice());
    let headers = [("authorization", authorization.as_str())];
    let mut client = HttpClient::connect(edge.addr).await;
    let fits = client
        .fetch(request("POST", "/api/echo", &headers, pattern(64 * 1024)))
        .await;
    assert_eq!(fits.status, 200);
    upstream.next_request().await;
    // Announced by Content-Length: refused before anything goes upstream.
    let mut client = HttpClient::connect(edge.addr).await;
    let announced = client
        .fetch(request(
            "POST",
            "/api/echo",
            &headers,
            pattern(64 * 1024 + 1),
        ))
        .await;
    assert_eq!(
        (announced.status, announced.json()["error"].as_str()),
        (413, Some("body_too_large"))
    );
    assert_eq!(upstream.requests_so_far(), 0);
    // Chunked, with no length said: cut off where it passes the limit.
    let chunk = "a".repeat(16 * 1024);
    let mut chunked = format!(
        "POST /api/echo HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    for _ in 0..5 {
        chunked.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    chunked.push_str("0\r\n\r\n");
    let response = raw_exchange(&edge, &chunked).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
}

#[tokio::test]
async fn a_slow_upload_that_keeps_moving_is_not_timed_out() {
    // Each piece comes within `http_timeout`, the whole takes longer: the upload is timed by
    // its progress, and its response by the wait after it.
    let (mut upstream, edge) = proxied("http_timeout = \"1s\"").await;
    let authorization = bearer(&alice());
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    let head = format!(
        "POST /api/echo HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for piece in ["01", "23", "45", "67", "89"] {
        tokio::time::sleep(Duration::from_millis(400)).await;
        stream.write_all(piece.as_bytes()).await.unwrap();
    }
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("an answer in time")
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("0123456789"), "{response}");
    assert_eq!(upstream.next_request().await.body, b"0123456789");
}

#[tokio::test]
async fn an_sse_stream_flows_event_by_event_and_arrives_whole_and_in_order() {
    let (upstream, edge) = proxied("").await;
    let authorization = bearer(&alice());
    let mut client = HttpClient::connect(edge.addr).await;
    let response = client
        .send(get("/api/sse?n=5000", &[("authorization", &authorization)]))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    // The first event arrives while the upstream still holds the other 4,999: nothing waits
    // for more of the stream.
    let mut text = String::new();
    while !text.ends_with("data: 0\n\n") {
        let chunk = next_chunk(&mut body).await.expect("the first event");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    upstream.release();
    while let Some(chunk) = next_chunk(&mut body).await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let expected: String = (0..5000)
        .map(|i| format!("id: {i}\ndata: {i}\n\n"))
        .collect();
    assert!(
        text == expected,
        "the stream arrived altered ({} bytes)",
        text.len()
    );
}

#[tokio::test]
async fn an_sse_stream_ends_when_the_token_expires() {
    let (_upstream, edge) = proxied("").await;
    let expires = now() + 2;
    let token = hs256(&claims("alice", json!({ "exp": expires })));
    let mut client = HttpClient::connect(edge.addr).await;
    let response = client
        .send(get("/api/sse", &[("authorization", &bearer(&token))]))
        .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut events = 0;
    // An endless stream, one event every 50 ms: it ends (cleanly) at the token's expiry.
    while let Some(chunk) = next_chunk(&mut body).await {
        events += String::from_utf8_lossy(&chunk).matches("\n\n").count();
    }
    let ended_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        ended_at >= expires as f64 - 0.05,
        "ended {:.2}s before exp",
        expires as f64 - ended_at
    );
    assert!(events >= 5, "only {events} events before the end");

    // Any other endless body is cut at the expiry, never ended as if it were whole.
    let expires = now() + 2;
    let token = hs256(&claims("alice", json!({ "exp": expires })));
    let response = client
        .send(get("/api/ndjson", &[("authorization", &bearer(&token))]))
        .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = 0;
    let ending = loop {
        match tokio::time::timeout(WAIT, http_body_util::BodyExt::frame(&mut body)).await {
            Ok(Some(Ok(frame))) => received += frame.data_ref().map_or(0, |data| data.len()),
            // Cut: the chunked body never got its last chunk.
            Ok(Some(Err(error))) => break Ok(error.to_string()),
            Ok(None) => break Err("the body ended as if it were complete"),
            Err(_) => break Err("the body went on past the token's expiry"),
        }
    };
    ending.unwrap();
    assert!(received > 0);
}

#[tokio::test]
async fn a_long_poll_is_held_for_seconds_and_a_silent_upstream_gets_504() {
    let (_upstream, edge) = proxied("").await;
    let authorization = bearer(&alice());
    let mut client = HttpClient::connect(edge.addr).await;
    let started = Instant::now();
    let polled = client
        .fetch(get(
            "/api/poll?ms=3000",
            &[("authorization", &authorization)],
        ))
        .await;
    assert_eq!((polled.status, polled.body.as_slice()), (200, &b"done"[..]));
    assert!(started.elapsed() >= Duration::from_secs(3));

    let (_upstream, edge) = proxied_with(ONE_EVENT_LOOP, "http_timeout = \"1s\"").await;
    let mut client = HttpClient::connect(edge.addr).await;
    // An exchange first, so that the stalled one goes on a pooled connection whose deadline
    // was set before.
    let quick = client
        .fetch(get("/api/poll?ms=0", &[("authorization", &authorization)]))
        .await;
    assert_eq!(quick.status, 200);
    let started = Instant::now();
    let timed_out = client
        .fetch(get(
            "/api/poll?ms=5000",
            &[("authorization", &authorization)],
        ))
        .await;
    assert_eq!(
        (timed_out.status, timed_out.json()["error"].as_str()),
        (504, Some("upstream_timeout"))
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
}

/// A raw connection that has sent alice's GETs for `paths` in one write (pipelined), once the
/// upstream has seen the first.
async fn raw_gets(edge: &TestEdge, upstream: &mut HttpUpstream, paths: &[&str]) -> TcpStream {
    let authorization = bearer(&alice());
    let heads: String = paths
        .iter()
        .map(|path| {
            format!("GET {path} HTTP/1.1\r\nhost: chat.example.com\r\nauthorization: {authorization}\r\n\r\n")
        })
        .collect();
    let mut client = TcpStream::connect(edge.addr).await.unwrap();
    client.write_all(heads.as_bytes()).await.unwrap();
    upstream.next_request().await;
    client
}

/// Reads the start of a response and checks it is a 200.
async fn read_200(client: &mut TcpStream) {
    let mut first = [0u8; 64];
    let read = client.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..read]).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_client_gone_mid_long_poll_or_stream_frees_its_upstream_request_at_once() {
    let (mut upstream, edge) = proxied("").await;
    // Held for 30 s by the upstream, and an SSE stream that waits after its first event: the
    // client leaves each while the edge waits on the upstream. The upstream's connection ends
    // at once, not when it would have answered (a waiting edge would hold it past WAIT).
    for (i, path) in ["/api/poll?ms=30000", "/api/sse?n=5"]
        .into_iter()
        .enumerate()
    {
        let mut client = raw_gets(&edge, &mut upstream, &[path]).await;
        if path.contains("sse") {
            read_200(&mut client).await;
        }
        drop(client);
        eventually(WAIT, "the upstream's connection ended", || async {
            upstream.ended.load(std::sync::atomic::Ordering::SeqCst) == i + 1
        })
        .await;
    }
    edge.wait_idle().await;
}

#[tokio::test]
async fn an_endless_stream_ends_soon_after_the_edge_begins_to_drain() {
    let (mut upstream, edge) = proxied("").await;
    let mut client = raw_gets(&edge, &mut upstream, &["/api/sse"]).await;
    read_200(&mut client).await;
    // An event every 50 ms, forever: the drain gives it a second, then ends the connection.
    let drained_at = Instant::now();
    edge.handle.shutdown();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
        .await
        .expect("the stream ended")
        .ok();
    let took = drained_at.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the stream went on for {took:?}"
    );
    assert!(
        String::from_utf8_lossy(&rest).contains("data: "),
        "events flowed until then"
    );
}

#[tokio::test]
async fn at_the_drain_the_request_in_flight_is_answered_and_the_pipelined_ones_are_not() {
    let (mut upstream, edge) = proxied("").await;
    let paths = ["/api/poll?ms=300", "/api/status/201"];
    let mut client = raw_gets(&edge, &mut upstream, &paths).await;
    edge.handle.shutdown();
    let mut answered = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut answered))
        .await
        .expect("the edge closed the connection")
        .ok();
    let answered = String::from_utf8_lossy(&answered);
    assert_eq!(answered.matches("HTTP/1.1 ").count(), 1, "{answered}");
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    assert!(answered.contains("connection: close"), "{answered}");
    assert!(answered.ends_with("done"), "{answered}");
}

#[tokio::test]
async fn cors_preflights_are_answered_at_the_edge_and_responses_name_the_origin() {
    let (mut upstream, edge) = proxied(r#"allowed_origins = ["https://chat.example.com"]"#).await;
    let preflight = [
        ("origin", "https://chat.example.com"),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "content-type"),
    ];
    let mut client = HttpClient::connect(edge.addr).await;
    let allowed = client
        .fetch(request("OPTIONS", "/api/echo", &preflight, Vec::new()))
        .await;
    assert_eq!(allowed.status, 204);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://chat.example.com")
    );
    assert_eq!(
        allowed.header("access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(allowed.header("access-control-allow-methods"), Some("POST"));
    assert_eq!(
        allowed.header("access-control-allow-headers"),
        Some("content-type")
    );
    let mut client = HttpClient::connect(edge.addr).await;
    let refused = client
        .fetch(request(
            "OPTIONS",
            "/api/echo",
            &[
                ("origin", "https://evil.example.com"),
                ("access-control-request-method", "POST"),
            ],
            Vec::new(),
        ))
        .await;
    assert_eq!(
        (refused.status, refused.json()["error"].as_str()),
        (403, Some("origin_not_allowed"))
    );
    assert_eq!(
        upstream.requests_so_far(),
        0,
        "a preflight reached the upstream"
    );

    let authorization = bearer(&alice());
    let mut client = HttpClient::connect(edge.addr).await;
    let response = client
        .fetch(request(
            "POST",
            "/api/echo",
            &[
                ("origin", "https://chat.example.com"),
                ("authorization", &authorization),
            ],
            b"from the page".to_vec(),
        ))
        .await;
    assert_eq!(response.status, 200);
    // The edge's answer, not the upstream's `*`.
    assert_eq!(
        response.header("access-control-allow-origin"),
        Some("https://chat.example.com")
    );
    assert_eq!(
        response.header("access-control-allow-credentials"),
        Some("true")
    );
    assert!(
        response
            .headers
            .get_all("vary")
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains("Origin")))
    );
    let mut client = HttpClient::connect(edge.addr).await;
    let elsewhere = client
        .fetch(get(
            "/api/echo",
            &[
                ("origin", "https://evil.example.com"),
                ("authorization", &authorization),
            ],
        ))
        .await;
    assert_eq!(elsewhere.status, 403);

    // Without an Origin (not a browser's cross-origin request) nothing is granted, and the
    // response still varies by Origin, so that no cache hands it to a page.
    let mut client = HttpClient::connect(edge.addr).await;
    let direct = client
        .fetch(get("/api/echo", &[("authorization", &authorization)]))
        .await;
    assert_eq!(direct.status, 200);
    assert_eq!(direct.header("access-control-allow-origin"), None);
    assert!(direct.headers.get_all("vary").iter().any(|v| v == "Origin"));

    // "*" lets any page read, but never with the user's cookies: only a named origin gets
    // credentials.
    let (_upstream, edge) = proxied(r#"allowed_origins = ["https://chat.example.com", "*"]"#).await;
    let mut client = HttpClient::connect(edge.addr).await;
    let cookie = format!("session={}", alice());
    for (origin, allow_origin, credentials) in [
        ("https://evil.example.com", "*", None),
        (
            "https://chat.example.com",
            "https://chat.example.com",
            Some("true"),
        ),
    ] {
        let preflight = client
            .fetch(request(
                "OPTIONS",
                "/api/echo",
                &[("origin", origin), ("access-control-request-method", "GET")],
                Vec::new(),
            ))
            .await;
        let response = client
            .fetch(get("/api/echo", &[("origin", origin), ("cookie", &cookie)]))
            .await;
        for answer in [&preflight, &response] {
            assert_eq!(
                answer.header("access-control-allow-origin"),
                Some(allow_origin)
            );
            assert_eq!(
                answer.header("access-control-allow-credentials"),
                credentials
            );
        }
    }
}

#[tokio::test]
async fn an_upgrade_to_anything_but_a_websocket_is_never_switched_nor_passed_on() {
    // h2c (RFC 7540 §3.2) and other protocols on an HTTP route: the edge answers them as the
    // plain requests they also are, or refuses them. It never switches protocols, and the
    // upstream never hears of the upgrade (Upgrade and what Connection names are hop-by-hop).
    let (mut upstream, edge) = proxied("").await;
    let authorization = bearer(&alice());
    // Each is answered as the plain GET it also is, but for a WebSocket upgrade without a
    // version (426, RFC 6455 §4.4).
    for (what, headers, status) in [
        (
            "h2c",
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
            200,
        ),
        ("TLS", "Connection: Upgrade\r\nUpgrade: TLS/1.2\r\n", 200),
        (
            "an upgrade the Connection header does not name",
            "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
            200,
        ),
        (
            "a websocket offered beside h2c, without a version",
            "Connection: Upgrade\r\nUpgrade: h2c, websocket\r\n",
            426,
        ),
    ] {
        let request = format!(
            "GET /api/echo HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\n{headers}Connection: close\r\n\r\n"
        );
        let response = raw_exchange(&edge, &request).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: {response}"
        );
        assert!(!response.contains(" 101 "), "{what}: {response}");
        if status == 200 {
            let seen = upstream.next_request().await;
            for name in ["upgrade", "http2-settings"] {
                assert_eq!(seen.request.header(name), None, "{what}: {name} passed on");
            }
            assert!(
                !seen
                    .request
                    .header_all("connection")
                    .iter()
                    .any(|value| value.to_ascii_lowercase().contains("upgrade")),
                "{what}: Connection: upgrade passed on"
            );
        }
    }
    assert_eq!(
        upstream.requests_so_far(),
        0,
        "a request reached the upstream twice"
    );
}

#[tokio::test]
async fn smuggling_and_header_games_are_refused() {
    let (mut upstream, edge) = proxied("").await;
    let authorization = bearer(&alice());
    // Content-Length and Transfer-Encoding both (RFC 9112 §6.1): the body is read as chunked,
    // the length dropped, the connection closed after the one response, and what the length
    // would have hidden never becomes a request.
    let both = format!(
        "POST /api/echo HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/status/299 HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\n\r\n"
    );
    let response = raw_exchange(&edge, &both).await;
    assert_eq!(response.matches("HTTP/1.1 ").count(), 1, "{response}");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = upstream.next_request().await;
    assert_eq!((seen.request.path(), seen.body.len()), ("/api/echo", 0));
    assert_eq!(seen.request.header("content-length"), None);

    for (what, request) in [
        (
            "an absolute-form target",
            format!(
                "GET http://elsewhere.example/api/echo HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\n\r\n"
            ),
        ),
        (
            "two Host headers",
            format!(
                "GET /api/echo HTTP/1.1\r\nHost: x\r\nHost: y\r\nAuthorization: {authorization}\r\n\r\n"
            ),
        ),
        (
            "a folded header",
            format!(
                "GET /api/echo HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\nAuthorization: {authorization}\r\n\r\n"
            ),
        ),
        (
            "a bad chunk size",
            format!(
                "POST /api/echo HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
            ),
        ),
    ] {
        let response = raw_exchange(&edge, &request).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{what}: {response}");
    }
    // A request that passes, so that anything refused before it would have arrived first.
    let mut client = HttpClient::connect(edge.addr).await;
    let passed = client
        .fetch(get("/api/status/299", &[("authorization", &authorization)]))
        .await;
    assert_eq!(passed.status, 299);
    let seen = upstream.next_request().await;
    assert_eq!(seen.request.path(), "/api/status/299");
    assert_eq!(
        upstream.requests_so_far(),
        0,
        "refused requests reached the upstream"
    );
}

#[tokio::test]
async fn a_connection_is_never_reused_after_an_aborted_response() {
    let (mut upstream, edge) = proxied_with(ONE_EVENT_LOOP, "").await;
    let authorization = bearer(&alice());
    let headers = [("authorization", authorization.as_str())];
    // The upstream promises 1,000 bytes and sends 500. Whether the edge had the head out before
    // the cut is a race; either way the client never takes the stub for a whole response: a 502,
    // or a 200 whose body fails short of its length and whose connection then closes.
    let mut client = HttpClient::connect(edge.addr).await;
    match client.try_send(get("/api/abort", &headers)).await {
        Ok(response) if response.status() == 502 => {}
        Ok(response) => {
            assert_eq!(response.status(), 200);
            let mut body = response.into_body();
            let mut received = 0;
            loop {
                match tokio::time::timeout(WAIT, http_body_util::BodyExt::frame(&mut body)).await {
                    Ok(Some(Ok(frame))) => received += frame.data_ref().map_or(0, |d| d.len()),
                    Ok(Some(Err(_))) | Ok(None) => break,
                    Err(_) => panic!("the aborted response neither ended nor failed"),
                }
            }
            assert!(received < 1000, "{received} bytes of a cut response");
            eventually(WAIT, "the client connection closing", || async {
                !client.is_open()
            })
            .await;
        }
        Err(error) => assert!(error.is_incomplete_message(), "{error}"),
    }
    // A client that leaves in the middle of a response: the upstream connection carrying the
    // rest of it is not handed to the next request.
    let mut leaving = HttpClient::connect(edge.addr).await;
    let response = leaving.send(get("/api/big?bytes=8388608", &headers)).await;
    let mut body = response.into_body();
    next_chunk(&mut body).await.expect("the start of the body");
    drop((body, leaving));
    upstream.requests_so_far();
    let before = upstream.accepted.load(std::sync::atomic::Ordering::SeqCst);
    let mut next = HttpClient::connect(edge.addr).await;
    let echoed = next
        .fetch(request("POST", "/api/echo", &headers, b"clean".to_vec()))
        .await;
    assert_eq!(
        (echoed.status, echoed.body.as_slice()),
        (200, &b"clean"[..])
    );
    assert_eq!(
        upstream.accepted.load(std::sync::atomic::Ordering::SeqCst),
        before + 1,
        "a connection with a response left half-read was reused"
    );
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_shared_between_clients() {
    let (mut upstream, edge) = proxied_with(ONE_EVENT_LOOP, "").await;
    let authorization = bearer(&alice());
    for _ in 0..5 {
        let mut client = HttpClient::connect(edge.addr).await;
        let response = client
            .fetch(get("/api/echo", &[("authorization", &authorization)]))
            .await;
        assert_eq!(response.status, 200);
        upstream.next_request().await;
    }
    assert_eq!(
        upstream.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "each request opened its own upstream connection"
    );
}

#[tokio::test]
async fn affinity_by_user_keeps_each_user_on_one_target() {
    let a = HttpUpstream::start("a").await;
    let b = HttpUpstream::start("b").await;
    // A hundred requests from one address: the per-address rate counts them all.
    let config = |affinity: &str| {
        EdgeConfig::new(&a.url("/api"))
            .server("handshake_rate_per_ip = \"off\"")
            .upstreams(&[&a.url("/api"), &b.url("/api")])
            .path("/api")
            .route("match = \"prefix\"\nhttp = \"proxy\"")
            .route(affinity)
            .build()
    };
    let served_by = |edge: &TestEdge, user: &str| {
        let authorization = bearer(&token_for(user));
        let addr = edge.addr;
        async move {
            let mut client = HttpClient::connect(addr).await;
            let response = client
                .fetch(get("/api/echo", &[("authorization", &authorization)]))
                .await;
            response.header("x-upstream").unwrap_or("?").to_owned()
        }
    };
    let edge = TestEdge::start(&config("affinity = \"user\"")).await;
    let mut seen = std::collections::HashSet::new();
    for user in 0..20 {
        let user = format!("user-{user}");
        let first = served_by(&edge, &user).await;
        for _ in 0..4 {
            assert_eq!(served_by(&edge, &user).await, first, "{user} moved");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 2, "twenty users all on one target");
    // Without affinity the same user goes round the targets.
    let edge = TestEdge::start(&config("")).await;
    let turns: Vec<String> = futures_util::future::join_all(
        (0..4)
            .map(|_| served_by(&edge, "alice"))
            .collect::<Vec<_>>(),
    )
    .await;
    assert!(
        turns.iter().any(|t| t == "a") && turns.iter().any(|t| t == "b"),
        "{turns:?}"
    );
}

#[tokio::test]
async fn requests_are_counted_timed_and_audited_without_their_query() {
    let upstream = HttpUpstream::start("a").await;
    let config = EdgeConfig::new(&upstream.url("/api"))
        .path("/api")
        .log("audit = \"{dir}/audit.jsonl\"")
        .policy(r#"token_from = ["header", "query:token"]"#)
        .route("match = \"prefix\"\nhttp = \"proxy\"");
    let edge = TestEdge::start(&config.build()).await;
    let token = alice();
    let mut client = HttpClient::connect(edge.addr).await;
    let response = client
        .fetch(request(
            "POST",
            &format!("/api/echo?token={token}&planted=PLANTED"),
            &[],
            b"12345".to_vec(),
        ))
        .await;
    assert_eq!(response.status, 200);
    edge.wait_metric(
        &format!("wsedge_http_requests_total{{{ROUTE},status=\"200\"}}"),
        1.0,
    )
    .await;
    edge.wait_metric(
        &format!("wsedge_http_request_seconds_count{{{ROUTE}}}"),
        1.0,
    )
    .await;
    let audit = edge.dir.path().join("audit.jsonl");
    let lines = audit_lines(&audit, 1).await;
    let line = &lines[0];
    assert_eq!(line["event"], "http");
    assert_eq!(
        (
            line["method"].as_str(),
            line["path"].as_str(),
            line["status"].as_u64()
        ),
        (Some("POST"), Some("/api/echo"), Some(200))
    );
    assert_eq!(
        (line["user"].as_str(), line["tenant"].as_str()),
        (Some("alice"), Some("acme"))
    );
    assert_eq!(
        (line["bytes_up"].as_u64(), line["bytes_down"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(line["complete"], true);
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(
        !text.contains(&token) && !text.contains("PLANTED"),
        "{text}"
    );
}

#[tokio::test]
async fn streams_in_flight_hold_connection_slots() {
    let upstream = HttpUpstream::start("a").await;
    let config = EdgeConfig::new(&upstream.url("/api"))
        .path("/api")
        .server("max_connections = 2")
        .route("match = \"prefix\"\nhttp = \"proxy\"");
    let edge = TestEdge::start(&config.build()).await;
    let authorization = bearer(&alice());
    let headers = [("authorization", authorization.as_str())];
    let mut first = HttpClient::connect(edge.addr).await;
    let one = first.send(get("/api/sse", &headers)).await;
    let mut second = HttpClient::connect(edge.addr).await;
    let two = second.send(get("/api/sse", &headers)).await;
    let mut third = HttpClient::connect(edge.addr).await;
    let full = third.fetch(get("/api/echo", &headers)).await;
    assert_eq!(
        (full.status, full.json()["error"].as_str()),
        (503, Some("capacity"))
    );
    // A stream that ends gives its slot back.
    drop((one, first));
    eventually(WAIT, "the first stream's slot coming back", || async {
        let mut client = HttpClient::connect(edge.addr).await;
        client.fetch(get("/api/echo", &headers)).await.status == 200
    })
    .await;
    drop((two, second));
}

#[tokio::test]
async fn the_per_address_rate_counts_tokens_to_verify_not_keep_alive_requests() {
    let (mut upstream, edge) = proxied_with(
        "handshake_rate_per_ip = { per_second = 0.2, burst = 3 }",
        "",
    )
    .await;
    // One client sending its token with each of ten requests verifies it once.
    let authorization = bearer(&alice());
    let mut client = HttpClient::connect(edge.addr).await;
    for i in 0..10 {
        let response = client
            .fetch(get("/api/echo", &[("authorization", &authorization)]))
            .await;
        assert_eq!(response.status, 200, "request {i}: {:?}", response.json());
    }
    assert_eq!(upstream.requests_so_far(), 10);
    // Each new token costs a verification: past the burst, the address is refused.
    let statuses: Vec<u16> = {
        let mut statuses = Vec::new();
        for user in ["bob", "carol", "dave"] {
            let authorization = bearer(&token_for(user));
            let response = client
                .fetch(get("/api/echo", &[("authorization", &authorization)]))
                .await;
            statuses.push(response.status);
        }
        statuses
    };
    assert_eq!(statuses[..2], [200, 200], "{statuses:?}");
    assert_eq!(statuses[2], 429, "{statuses:?}");
}
