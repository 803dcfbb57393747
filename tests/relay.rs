//! The relay: frames arrive complete and in order both ways, close codes pass through, the
//! edge's own closes use the codes the README names, and nothing stays open afterwards.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn chat_url(edge: &TestEdge) -> String {
    edge.url(&format!("/ws/chat?token={}", token_for("alice")))
}

#[tokio::test]
async fn ten_thousand_streamed_messages_arrive_complete_and_in_order() {
    let (_upstream, edge) = start_edge(|c| c).await;
    let mut ws = connect_ok(&chat_url(&edge), &[]).await;
    ws.send(Message::text("stream 10000")).await.unwrap();
    for expected in 0..10_000 {
        assert_eq!(next_text(&mut ws).await, expected.to_string());
    }
    ws.close(None).await.unwrap();
    edge.wait_idle().await;
    edge.stop().await;
}

#[tokio::test]
async fn client_messages_reach_the_upstream_in_order() {
    let (_upstream, edge) = start_edge(|c| c.route(r#"message_rate = "off""#)).await;
    let mut ws = connect_ok(&chat_url(&edge), &[]).await;
    for i in 0..2000 {
        ws.feed(Message::text(format!("msg {i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..2000 {
        assert_eq!(next_text(&mut ws).await, format!("msg {i}"));
    }
    drop(ws);
    edge.wait_idle().await;
}

#[tokio::test]
async fn binary_payloads_from_one_byte_to_256_kib_are_intact_both_ways() {
    let (_upstream, edge) = start_edge(|c| c.route("max_message_size = \"1MiB\"")).await;
    let mut ws = connect_ok(&chat_url(&edge), &[]).await;
    for size in [
        1usize,
        2,
        125,
        126,
        127,
        65535,
        65536,
        65537,
        100_000,
        256 * 1024,
    ] {
        // Client → upstream → (echo) → client.
        ws.send(binary(pattern(size))).await.unwrap();
        match next_message(&mut ws).await {
            Message::Binary(data) => assert!(
                data[..] == pattern(size)[..],
                "echo of {size} bytes corrupted"
            ),
            other => panic!("expected binary, got {other:?}"),
        }
        // Upstream-originated.
        ws.send(Message::text(format!("binary {size}")))
            .await
            .unwrap();
        match next_message(&mut ws).await {
            Message::Binary(data) => assert!(
                data[..] == pattern(size)[..],
                "{size} bytes from upstream corrupted"
            ),
            other => panic!("expected binary, got {other:?}"),
        }
    }
    ws.close(None).await.unwrap();
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_client_close_code_and_reason_reach_the_upstream() {
    let (mut upstream, edge) = start_edge(|c| c).await;
    let mut ws = connect_ok(&chat_url(&edge), &[]).await;
    upstream.next_request().await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "bye now".into(),
    }))
    .await
    .unwrap();
    // The client gets its close echoed and the connection ends.
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Close(Some(frame)) = message {
            assert_eq!(u16::from(frame.code), 4000);
        }
    }
    assert_eq!(
        upstream.next_close().await,
        Some((4000, "bye now".to_owned()))
    );
    edge.wait_idle().await;
}

#[tokio::test]
async fn an_upstream_close_code_and_reason_reach_the_client() {
    let (_upstream, edge) = start_edge(|c| c).await;
    let mut ws = connect_ok(&chat_url(&edge), &[]).await;
    ws.send(Message::text("close 4003 conversation archived"))
        .await
        .unwrap();
    match next_message(&mut ws).await {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 4003);
            assert_eq!(frame.reason.as_str(), "conversation archived");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    edge.wait_idle().await;
}

#[tokio::test]
async fn an_upstream_killed_mid_stream_gives_the_client_1014_without_waiting_for_heartbeats() {
    let (_upstream, edge) = start_edge(|c| c).await;
    let token = token_for("alice");
    let mut raw = RawClient::connect(edge.addr, &format!("/ws/chat?token={token}"), &[]).await;
    raw.send_text("stream-then-die 2000").await;
    // Whatever arrived before the death is an in-order prefix; then the 1014.
    let mut expected = 0;
    let mut last_message_at = std::time::Instant::now();
    let code = loop {
        let frame = raw
            .read_answering_pings()
            .await
            .expect("a close frame, not a silent end");
        if frame.opcode == 8 {
            break frame.close_code();
        }
        assert_eq!(frame.payload, expected.to_string().as_bytes());
        expected += 1;
        last_message_at = std::time::Instant::now();
    };
    assert_eq!(code, Some(1014));
    let after_last = last_message_at.elapsed();
    // Heartbeats (30 s + 10 s by default) would take far longer to find a dead upstream.
    assert!(
        after_last < std::time::Duration::from_secs(5),
        "1014 came {after_last:?} after the stream stopped"
    );
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_message_over_max_message_size_gets_1009_and_the_upstream_is_told() {
    let (mut upstream, edge) = start_edge(|c| c.route("max_message_size = \"64KiB\"")).await;
    let token = token_for("alice");
    let mut raw = RawClient::connect(edge.addr, &format!("/ws/chat?token={token}"), &[]).await;
    upstream.next_request().await;
    // Exactly at the limit passes.
    raw.send_frame(true, 2, &pattern(64 * 1024)).await;
    let echoed = raw
        .read_message()
        .await
        .expect("echo of a message at the limit");
    assert_eq!(echoed.payload.len(), 64 * 1024);
    // One byte over does not.
    raw.send_frame(true, 2, &pattern(64 * 1024 + 1)).await;
    assert_eq!(raw.read_close_code().await, Some(1009));
    assert_eq!(
        upstream.next_close().await.map(|(code, _)| code),
        Some(1001)
    );
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_client_that_vanishes_releases_its_upstream() {
    let (mut upstream, edge) = start_edge(|c| c).await;
    let token = token_for("alice");
    let raw = RawClient::connect(edge.addr, &format!("/ws/chat?token={token}"), &[]).await;
    upstream.next_request().await;
    assert_eq!(edge.handle.stats().open_connections(), 1);
    raw.vanish();
    assert_eq!(
        upstream.next_close().await.map(|(code, _)| code),
        Some(1001)
    );
    edge.wait_idle().await;
}

#[tokio::test]
async fn pings_are_answered_per_hop_and_not_forwarded() {
    let (_upstream, edge) = start_edge(|c| c).await;
    let token = token_for("alice");
    let mut raw = RawClient::connect(edge.addr, &format!("/ws/chat?token={token}"), &[]).await;
    raw.send_frame(true, 9, b"are you there").await;
    let pong = raw.read_frame().await.expect("a pong");
    assert_eq!(pong.opcode, 10);
    assert_eq!(pong.payload, b"are you there");
    // The upstream echoes data; had the ping been forwarded, its pong would come back as a second frame.
    raw.send_text("after ping").await;
    let next = raw.read_frame().await.expect("the echo");
    assert_eq!(
        (next.opcode, next.payload.as_slice()),
        (1, &b"after ping"[..])
    );
}

#[tokio::test]
async fn invalid_utf8_from_the_client_is_closed_with_1007() {
    let (_upstream, edge) = start_edge(|c| c).await;
    let token = token_for("alice");
    let mut raw = RawClient::connect(edge.addr, &format!("/ws/chat?token={token}"), &[]).await;
    raw.send_frame(true, 1, &[0xff, 0xfe, 0xfd]).await;
    assert_eq!(raw.read_close_code().await, Some(1007));
    edge.wait_idle().await;
}

#[tokio::test]
async fn shutdown_closes_clients_with_1001() {
    let (_upstream, edge) = start_edge(|c| c).await;
    let token = token_for("alice");
    let mut raw = RawClient::connect(edge.addr, &format!("/ws/chat?token={token}"), &[]).await;
    raw.send_text("ping me").await;
    raw.read_frame().await.expect("echo");
    edge.handle.shutdown();
    assert_eq!(raw.read_close_code().await, Some(1001));
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_close_without_a_code_is_passed_on_at_once() {
    let (mut upstream, edge) = start_edge(|c| c).await;
    let mut ws = connect_ok(&chat_url(&edge), &[]).await;
    upstream.next_request().await;
    let started = std::time::Instant::now();
    ws.close(None).await.unwrap();
    // 1005 is what a close frame without a status code reads as.
    assert_eq!(
        upstream.next_close().await.map(|(code, _)| code),
        Some(1005)
    );
    // Not after the edge's 3 s close timeout: passed on as it came.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    edge.wait_idle().await;
}

#[tokio::test]
async fn registered_close_codes_from_the_upstream_reach_the_client_unchanged() {
    let (_upstream, edge) = start_edge(|c| c).await;
    for code in [1012u16, 1013, 1014] {
        let token = token_for("alice");
        let mut raw = RawClient::connect(edge.addr, &format!("/ws/chat?token={token}"), &[]).await;
        raw.send_text(&format!("close {code} from the chat core"))
            .await;
        let frame = raw.read_answering_pings().await.expect("a close frame");
        assert_eq!(frame.close_code(), Some(code));
        assert_eq!(&frame.payload[2..], b"from the chat core");
    }
    edge.wait_idle().await;
}

#[tokio::test]
async fn endless_empty_fragments_are_stopped_with_1009() {
    let (mut upstream, edge) = start_edge(|c| c.route("max_message_size = \"16KiB\"")).await;
    let client = RawClient::connect(
        edge.addr,
        &format!("/ws/chat?token={}", token_for("alice")),
        &[],
    )
    .await;
    upstream.next_request().await;
    // Each empty fragment would cost the upstream a frame: each counts as a byte.
    assert_eq!(client.flood_empty_fragments().await, Some(1009));
    edge.wait_idle().await;
}
