//! A connection's life after the upgrade: heartbeats both ways, idle and session limits, token
//! expiry, and the edge releasing everything afterwards.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn path_with(token: &str) -> String {
    format!("/ws/chat?token={token}")
}

/// Asserts that nothing but pings/pongs arrives on `ws` for `period` (reading drives the
/// automatic pong replies, as a live client's would).
async fn stays_open(ws: &mut Client, period: Duration) {
    let deadline = tokio::time::Instant::now() + period;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("the connection should have stayed open, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_closed_within_interval_plus_timeout() {
    let (mut upstream, edge) =
        start_edge(|c| c.route("ping_interval = \"300ms\"\npong_timeout = \"300ms\"")).await;
    let started = Instant::now();
    // A raw client answers nothing unless asked to.
    let silent = RawClient::connect(edge.addr, &path_with(&token_for("alice")), &[]).await;
    upstream.next_request().await;
    let (code, reason) = upstream
        .next_close()
        .await
        .expect("the upstream gets a close frame");
    let elapsed = started.elapsed();
    assert_eq!((code, reason.as_str()), (1001, "client went away"));
    assert!(
        elapsed >= Duration::from_millis(550),
        "closed too early: {elapsed:?}"
    );
    // Well before the default heartbeat (30 s + 10 s) could have done it.
    assert!(
        elapsed < Duration::from_secs(5),
        "closed too late: {elapsed:?}"
    );
    edge.wait_idle().await;
    drop(silent);
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let (_upstream, edge) =
        start_edge(|c| c.route("ping_interval = \"200ms\"\npong_timeout = \"200ms\"")).await;
    let mut ws = connect_ok(&edge.url(&path_with(&token_for("alice"))), &[]).await;
    // Five heartbeat windows without any data.
    stays_open(&mut ws, Duration::from_millis(2000)).await;
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "still here");
    ws.close(None).await.unwrap();
    edge.wait_idle().await;
}

#[tokio::test]
async fn an_upstream_that_stops_answering_gives_the_client_1014() {
    let (_upstream, edge) =
        start_edge(|c| c.route("ping_interval = \"300ms\"\npong_timeout = \"300ms\"")).await;
    let mut client = RawClient::connect(edge.addr, &path_with(&token_for("alice")), &[]).await;
    client.send_text("freeze").await;
    let frozen_at = Instant::now();
    let frame = client.read_answering_pings().await.expect("a close frame");
    let elapsed = frozen_at.elapsed();
    assert_eq!(
        frame.close_code(),
        Some(1014),
        "opcode {} payload {:?}",
        frame.opcode,
        frame.payload
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "closed too late: {elapsed:?}"
    );
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_client_that_sends_but_never_answers_pings_is_closed() {
    let (mut upstream, edge) = start_edge(|c| {
        c.route("ping_interval = \"200ms\"\npong_timeout = \"300ms\"\nmessage_rate = \"off\"")
    })
    .await;
    let mut client = RawClient::connect(edge.addr, &path_with(&token_for("alice")), &[]).await;
    upstream.next_request().await;
    // Sending is not answering: its own pings every 50 ms, never a pong.
    let mut writer = client.take_writer();
    let chatter = tokio::spawn(async move {
        while writer.send_frame(9, b"mine").await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let started = Instant::now();
    // The edge's pongs to its pings, then its close.
    let code = tokio::time::timeout(WAIT, async {
        loop {
            let frame = client.read_ignoring_pings().await.expect("a close frame");
            if frame.opcode == 8 {
                break frame.close_code();
            }
        }
    })
    .await
    .expect("the client was never closed");
    assert_eq!(code, Some(1001));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        upstream.next_close().await.map(|(code, _)| code),
        Some(1001)
    );
    chatter.abort();
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_frozen_upstream_is_found_while_the_client_keeps_sending() {
    let (_upstream, edge) = start_edge(|c| {
        c.route("ping_interval = \"200ms\"\npong_timeout = \"300ms\"\nmessage_rate = \"off\"")
    })
    .await;
    let mut client = RawClient::connect(edge.addr, &path_with(&token_for("alice")), &[]).await;
    client.send_text("freeze").await;
    // The upstream's kernel still takes what the edge writes: that is no answer. The client
    // itself is alive: it answers the edge's pings.
    let mut writer = client.take_writer();
    let (pongs, mut to_answer) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let chatter = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            let sent = tokio::select! {
                _ = tick.tick() => writer.send_frame(1, b"are you there?").await,
                Some(payload) = to_answer.recv() => writer.send_frame(10, &payload).await,
            };
            if !sent {
                break;
            }
        }
    });
    let frozen_at = Instant::now();
    let code = tokio::time::timeout(WAIT, async {
        loop {
            let frame = client.read_frame().await.expect("a close frame");
            match frame.opcode {
                8 => break frame.close_code(),
                9 => {
                    let _ = pongs.send(frame.payload);
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the frozen upstream was never found");
    assert_eq!(code, Some(1014));
    assert!(frozen_at.elapsed() < Duration::from_secs(5));
    chatter.abort();
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_client_that_reads_nothing_while_the_upstream_streams_is_closed() {
    let (mut upstream, edge) =
        start_edge(|c| c.route("ping_interval = \"300ms\"\npong_timeout = \"300ms\"")).await;
    let mut client = RawClient::connect(edge.addr, &path_with(&token_for("alice")), &[]).await;
    // 64 MiB cannot fit in socket buffers: the edge's writes to the client block.
    client.send_text("flood 1024 65536").await;
    let (code, _) = upstream
        .next_close()
        .await
        .expect("the upstream gets a close frame");
    assert_eq!(code, 1001);
    edge.wait_idle().await;
    drop(client);
}

#[tokio::test]
async fn a_slow_reader_that_keeps_reading_is_not_closed() {
    // A phone on a slow link: it takes the stream at ~4 MB/s, far slower than the upstream
    // sends, for about twice the stall window (interval + timeout = 2.25 s). Its pongs come
    // after the backlog queued before each ping (loopback lets the edge's send buffer grow to
    // MiBs: the timeout is sized to drain it).
    let (mut upstream, edge) = start_edge(|c| {
        c.route("ping_interval = \"250ms\"\npong_timeout = \"2s\"\nmessage_rate = \"off\"")
    })
    .await;
    let mut client = RawClient::connect_with_receive_buffer(
        edge.addr,
        &path_with(&token_for("alice")),
        128 << 10,
    )
    .await;
    upstream.next_request().await;
    const MESSAGES: usize = 1250;
    client.send_text(&format!("flood {MESSAGES} 16384")).await;
    let expected = pattern(16384);
    // 1,250 reads 4 ms apart: the stream lasts longer than the stall window, and the client
    // is read throughout.
    for i in 0..MESSAGES {
        let frame = client.read_message().await.expect("the stream");
        assert_eq!(frame.opcode, 2, "message {i}: {:?}", frame.close_code());
        assert!(frame.payload == expected, "message {i} corrupted");
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    client.send_frame(true, 8, &1000u16.to_be_bytes()).await;
    assert_eq!(client.read_close_code().await, Some(1000));
    assert_eq!(
        upstream.next_close().await.map(|(code, _)| code),
        Some(1000)
    );
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_token_that_expires_gets_4001_on_time_and_a_longer_one_stays() {
    let (mut upstream, edge) = start_edge(|c| c).await;
    let expires = now() + 2;
    // A fractional `exp`, as Python's `time.time()` writes it, is enforced like a whole one.
    let short = hs256(&claims("alice", json!({ "exp": expires as f64 + 0.25 })));
    let mut long_lived = connect_ok(&edge.url(&path_with(&token_for("bob"))), &[]).await;
    upstream.next_request().await;
    let mut client = RawClient::connect(edge.addr, &path_with(&short), &[]).await;
    upstream.next_request().await;
    let code = client.read_close_code().await;
    let closed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert_eq!(code, Some(4001));
    assert!(
        closed_at >= expires as f64 - 0.05,
        "closed {:.2}s before exp",
        expires as f64 - closed_at
    );
    assert!(
        closed_at < expires as f64 + 5.0,
        "closed {:.2}s after exp",
        closed_at - expires as f64
    );
    assert_eq!(
        upstream.next_close().await,
        Some((1000, "token expired".to_owned()))
    );
    // The other connection is untouched.
    long_lived.send(Message::text("still mine")).await.unwrap();
    assert_eq!(next_text(&mut long_lived).await, "still mine");
    long_lived.close(None).await.unwrap();
    edge.wait_idle().await;
}

#[tokio::test]
async fn token_expiry_grace_and_ignore() {
    let (_upstream, edge) = start_edge(|c| c.route("token_expiry_grace = \"1s\"")).await;
    let expires = now() + 1;
    let short = hs256(&claims("alice", json!({ "exp": expires })));
    let mut client = RawClient::connect(edge.addr, &path_with(&short), &[]).await;
    assert_eq!(client.read_close_code().await, Some(4001));
    let closed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        closed_at >= expires as f64 + 0.95,
        "grace not honoured: {:.2}s after exp",
        closed_at - expires as f64
    );
    edge.stop().await;

    let (_upstream, edge) = start_edge(|c| c.route("token_expiry = \"ignore\"")).await;
    let short = hs256(&claims("alice", json!({ "exp": now() + 1 })));
    let mut ws = connect_ok(&edge.url(&path_with(&short)), &[]).await;
    stays_open(&mut ws, Duration::from_millis(2500)).await;
    ws.send(Message::text("expired but ignored")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "expired but ignored");
}

#[tokio::test]
async fn idle_timeout_closes_silent_sessions_and_activity_keeps_them() {
    let (mut upstream, edge) = start_edge(|c| c.route("idle_timeout = \"600ms\"")).await;
    let mut busy = connect_ok(&edge.url(&path_with(&token_for("alice"))), &[]).await;
    upstream.next_request().await;
    let started = Instant::now();
    let mut idle = RawClient::connect(edge.addr, &path_with(&token_for("bob")), &[]).await;
    upstream.next_request().await;
    // The busy client talks every 200 ms while the idle one says nothing.
    let chat = async {
        for i in 0..6 {
            busy.send(Message::text(format!("tick {i}"))).await.unwrap();
            assert_eq!(next_text(&mut busy).await, format!("tick {i}"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let (code, ()) = tokio::join!(idle.read_answering_pings(), chat);
    let elapsed = started.elapsed();
    assert_eq!(code.and_then(|f| f.close_code()), Some(1001));
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
    busy.send(Message::text("alive")).await.unwrap();
    assert_eq!(next_text(&mut busy).await, "alive");
    busy.close(None).await.unwrap();
    edge.wait_idle().await;
}

#[tokio::test]
async fn max_session_closes_even_a_busy_session() {
    let (_upstream, edge) = start_edge(|c| c.route("max_session = \"700ms\"")).await;
    let started = Instant::now();
    let mut client = RawClient::connect(edge.addr, &path_with(&token_for("alice")), &[]).await;
    let code = loop {
        client.send_text("busy").await;
        let frame = client.read_answering_pings().await.expect("a frame");
        if frame.opcode == 8 {
            break frame.close_code();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, Some(1001));
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(650) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    edge.wait_idle().await;
}

#[tokio::test]
async fn the_message_rate_limit_is_exact_and_closes_with_1008() {
    let (mut upstream, edge) =
        start_edge(|c| c.route("message_rate = { per_second = 1, burst = 5 }")).await;
    let mut client = RawClient::connect(edge.addr, &path_with(&token_for("alice")), &[]).await;
    upstream.next_request().await;
    for i in 0..5 {
        client.send_text(&format!("m{i}")).await;
        let echo = client
            .read_answering_pings()
            .await
            .expect("echo within the burst");
        assert_eq!(echo.payload, format!("m{i}").as_bytes());
    }
    client.send_text("one too many").await;
    assert_eq!(client.read_close_code().await, Some(1008));
    assert_eq!(
        upstream.next_close().await.map(|(code, _)| code),
        Some(1001)
    );
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_stalled_upstream_is_blamed_not_the_client_it_stopped_reading() {
    let (mut upstream, edge) = start_edge(|c| {
        c.route("ping_interval = \"300ms\"\npong_timeout = \"300ms\"\nmessage_rate = \"off\"")
    })
    .await;
    let mut client = RawClient::connect(edge.addr, &path_with(&token_for("alice")), &[]).await;
    client.send_text("freeze").await;
    upstream.next_request().await;
    // The client pushes until the frozen upstream's buffers are full: the edge stops reading the
    // client, so the client's pongs cannot be read either. That is the upstream's fault.
    let mut writer = client.take_writer();
    let pusher = tokio::spawn(async move {
        let payload = pattern(64 * 1024);
        while writer.send_frame(2, &payload).await {}
    });
    let code = loop {
        let frame = client.read_frame().await.expect("a close frame");
        if frame.opcode == 8 {
            break frame.close_code();
        }
    };
    assert_eq!(
        code,
        Some(1014),
        "the client was blamed for the upstream's stall"
    );
    pusher.abort();
    edge.wait_idle().await;
}
