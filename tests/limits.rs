//! Limits at the handshake, each exact and with the status the README names: per-user
//! connections and per-IP handshake rate (429), slow clients (handshake_timeout), oversized
//! headers (431); and upstream resilience: a target that fails is skipped for a cool-down.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn chat(edge: &TestEdge, token: &str) -> String {
    edge.url(&format!("/ws/chat?token={token}"))
}

#[tokio::test]
async fn per_user_connections_are_exact_and_give_429() {
    let upstream = Upstream::start().await;
    let config = EdgeConfig::new(&upstream.url("/ws"))
        .server("max_connections_per_user = 2")
        .build();
    let edge = TestEdge::start(&config).await;
    let alice = token_for("alice");
    let mut first = connect_ok(&chat(&edge, &alice), &[]).await;
    let _second = connect_ok(&chat(&edge, &alice), &[]).await;
    let refused = connect_refused(&chat(&edge, &alice), &[]).await;
    assert_eq!(
        (refused.status, refused.body["error"].as_str()),
        (429, Some("too_many_connections"))
    );
    assert_eq!(refused.headers["retry-after"], "1");
    // Another user, and the same user name in another tenant, are counted apart.
    connect_ok(&chat(&edge, &token_for("bob")), &[]).await;
    connect_ok(
        &chat(
            &edge,
            &hs256(&claims("alice", json!({ "tenant_id": "globex" }))),
        ),
        &[],
    )
    .await;
    // Closing one gives the slot back.
    first.close(None).await.unwrap();
    drop(first);
    eventually(WAIT, "alice's slot coming back", || async {
        match connect(&chat(&edge, &alice), &[]).await {
            Ok(_) => true,
            Err(refused) => {
                assert_eq!(refused.status, 429);
                false
            }
        }
    })
    .await;
}

#[tokio::test]
async fn per_ip_handshake_rate_is_exact_and_gives_429() {
    let upstream = Upstream::start().await;
    let config = EdgeConfig::new(&upstream.url("/ws"))
        .server("handshake_rate_per_ip = { per_second = 0.2, burst = 3 }")
        .build();
    let edge = TestEdge::start(&config).await;
    let token = token_for("alice");
    // Every request counts, refused or not: the bucket protects the JWT check itself.
    let first = connect_refused(&edge.url("/ws/chat"), &[]).await;
    assert_eq!(first.status, 401);
    connect_ok(&chat(&edge, &token), &[]).await;
    connect_ok(&chat(&edge, &token), &[]).await;
    let refused = connect_refused(&chat(&edge, &token), &[]).await;
    assert_eq!(
        (refused.status, refused.body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    assert_eq!(refused.headers["retry-after"], "1");
}

#[tokio::test]
async fn a_slow_loris_is_dropped_at_handshake_timeout_while_others_are_served() {
    let upstream = Upstream::start().await;
    let config = EdgeConfig::new(&upstream.url("/ws"))
        .server("handshake_timeout = \"500ms\"")
        .build();
    let edge = TestEdge::start(&config).await;
    let started = Instant::now();
    // One sends half a request and stops; one sends nothing at all.
    let mut partial = TcpStream::connect(edge.addr).await.unwrap();
    partial
        .write_all(b"GET /ws/chat HTTP/1.1\r\nHost: x\r\nUpgrade: web")
        .await
        .unwrap();
    let mut mute = TcpStream::connect(edge.addr).await.unwrap();
    // Meanwhile a normal client connects and talks.
    let mut ws = connect_ok(&chat(&edge, &token_for("alice")), &[]).await;
    ws.send(Message::text("served")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "served");
    for stream in [&mut partial, &mut mute] {
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
            .await
            .expect("the slow client must be dropped")
            .ok();
        assert!(
            !String::from_utf8_lossy(&rest).contains(" 101 "),
            "no upgrade for a slow client"
        );
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(450),
        "dropped too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "dropped too late: {elapsed:?}"
    );
    ws.send(Message::text("still served")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "still served");
}

#[tokio::test]
async fn a_tls_client_that_never_starts_tls_is_dropped_at_handshake_timeout() {
    let upstream = Upstream::start().await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    ca.write(dir.path(), "edge", &["localhost"]);
    let config = EdgeConfig::new(&upstream.url("/ws"))
        .server("handshake_timeout = \"400ms\"\ntls = { cert = \"edge.crt\", key = \"edge.key\" }")
        .build();
    let edge = TestEdge::start_in(&config, dir).await;
    let started = Instant::now();
    let mut mute = TcpStream::connect(edge.addr).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, mute.read_to_end(&mut rest))
        .await
        .expect("dropped")
        .ok();
    assert!(started.elapsed() >= Duration::from_millis(350));
}

#[tokio::test]
async fn oversized_request_headers_get_431() {
    let upstream = Upstream::start().await;
    let config = EdgeConfig::new(&upstream.url("/ws"))
        .server("max_header_size = \"8KiB\"")
        .build();
    let edge = TestEdge::start(&config).await;
    let token = token_for("alice");
    let big = "x".repeat(10 * 1024);
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    let request = format!(
        "GET /ws/chat?token={token} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Big: {big}\r\n\r\n"
    );
    // The edge may answer and close before reading everything; a reset is fine.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("an answer");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    // A normal request still fits.
    connect_ok(&chat(&edge, &token), &[("X-Small", "y")]).await;
}

#[tokio::test]
async fn a_target_that_times_out_is_skipped_for_its_cooldown() {
    let silent = Upstream::start_mode(UpstreamMode::Silent).await;
    let mut live = Upstream::start().await;
    let config = EdgeConfig::new(&silent.url("/ws"))
        .upstreams(&[&silent.url("/ws"), &live.url("/ws")])
        .route("connect_timeout = \"300ms\"\nupstream_cooldown = \"1m\"");
    let edge = TestEdge::start(&config.build()).await;
    let token = token_for("alice");
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(connect_ok(&chat(&edge, &token), &[]).await);
    }
    assert_eq!(
        live.handshakes_so_far(),
        6,
        "every client was served by the live target"
    );
    assert_eq!(
        silent.accepted.load(Ordering::SeqCst),
        1,
        "the silent target was tried once, then skipped"
    );
    let mut ws = clients.pop().unwrap();
    ws.send(Message::text("served")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "served");
}

#[tokio::test]
async fn when_every_target_times_out_the_client_gets_504() {
    let a = Upstream::start_mode(UpstreamMode::Silent).await;
    let b = Upstream::start_mode(UpstreamMode::Silent).await;
    let config = EdgeConfig::new(&a.url("/ws"))
        .upstreams(&[&a.url("/ws"), &b.url("/ws")])
        .route("connect_timeout = \"200ms\"");
    let edge = TestEdge::start(&config.build()).await;
    let refused = connect_refused(&chat(&edge, &token_for("alice")), &[]).await;
    assert_eq!(
        (refused.status, refused.body["error"].as_str()),
        (504, Some("upstream_timeout"))
    );
    assert_eq!(
        a.accepted.load(Ordering::SeqCst) + b.accepted.load(Ordering::SeqCst),
        2,
        "both were tried"
    );
    edge.wait_idle().await;
}

#[tokio::test]
async fn clients_that_have_not_upgraded_are_capped_and_upgraded_ones_do_not_count() {
    let upstream = Upstream::start().await;
    // A handshake timeout far beyond WAIT: only the cap can close a silent client in time.
    let config = EdgeConfig::new(&upstream.url("/ws"))
        .server("max_pending_handshakes = 2\nmax_pending_handshakes_per_ip = 0\nhandshake_timeout = \"60s\"")
        .build();
    let edge = TestEdge::start(&config).await;
    // Upgraded connections hold no pending slot.
    let mut upgraded = Vec::new();
    for _ in 0..3 {
        upgraded.push(connect_ok(&chat(&edge, &token_for("alice")), &[]).await);
    }
    // Three silent clients: two take both slots, and whichever comes last is closed at once,
    // long before the handshake timeout.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(edge.addr).await.unwrap());
    }
    let reads = silent.iter_mut().map(|stream| {
        Box::pin(async move {
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
        })
    });
    tokio::time::timeout(WAIT, futures_util::future::select_all(reads))
        .await
        .expect("one of three silent clients is closed at once");
    edge.wait_metric(
        "wsedge_limit_hits_total{kind=\"max_pending_handshakes\"}",
        1.0,
    )
    .await;
    // Once the silent ones go, new clients are served again.
    drop(silent);
    eventually(WAIT, "the pending slots coming back", || async {
        // The edge may not have seen the silent clients leave yet: a refused attempt is an I/O
        // error here, not a test failure.
        let tcp = TcpStream::connect(edge.addr).await.unwrap();
        let attempt = tokio_tungstenite::client_async(chat(&edge, &token_for("bob")), tcp);
        matches!(
            tokio::time::timeout(Duration::from_secs(2), attempt).await,
            Ok(Ok(_))
        )
    })
    .await;
}
