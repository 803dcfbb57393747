//! Memory stays bounded under misbehaviour: a client that reads nothing while its upstream
//! streams 100 MiB costs the edge (a separate process, measured from /proc) a bounded amount,
//! backpressure stops the upstream, and once the client reads, every byte arrives in order.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::process::EdgeProcess;
use common::*;

const MESSAGES: usize = 1600;
const SIZE: usize = 64 * 1024; // 1600 × 64 KiB = 100 MiB
/// The most the edge's peak resident memory may grow while holding a stalled 100 MiB stream:
/// what it holds is one message and its buffers, far below this.
const BOUND_KIB: u64 = 16 * 1024;

/// Heartbeats off: a client that reads nothing must stay connected for the measurement.
fn config(upstream: &str, route_extra: &str) -> String {
    EdgeConfig::new(upstream)
        .route("ping_interval = \"off\"\nmax_message_size = \"1MiB\"")
        .route(route_extra)
        .build()
}

/// A raw client of alice's on the edge's chat route; `query` is appended to the token.
async fn alice(edge: &EdgeProcess, query: &str) -> RawClient {
    let path = format!("/ws/chat?token={}{query}", token_for("alice"));
    RawClient::connect(edge.addr, &path, &[]).await
}

/// Waits until a writer's byte counter has not moved for a whole second (its writes are
/// blocked by backpressure) and returns the count; fails if it never stops within a minute.
async fn stalled(counter: &AtomicU64, writer: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = u64::MAX;
    let mut still_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = counter.load(Ordering::SeqCst);
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() >= Duration::from_secs(1) {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "{writer} never stalled: {now} bytes sent"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_reads_nothing_holds_the_edge_to_a_bounded_memory() {
    let upstream = Upstream::start().await;
    let edge = EdgeProcess::start(&config(&upstream.url("/ws/chat"), ""), &[]).await;
    let baseline = edge.memory_kib("VmRSS");

    let mut client = alice(&edge, "").await;
    client.send_text(&format!("flood {MESSAGES} {SIZE}")).await;

    // Wait until the upstream's writes stall: no progress for a whole second.
    let last = stalled(&upstream.flooded, "the upstream").await;
    let total = (MESSAGES * SIZE) as u64;
    assert!(
        last < total / 2,
        "backpressure did not stop the upstream: {last} of {total} bytes sent"
    );
    let peak = edge.memory_kib("VmHWM");
    let growth = peak.saturating_sub(baseline);
    println!(
        "stalled after {} KiB of {} KiB; edge RSS baseline {baseline} KiB, peak {peak} KiB, growth {growth} KiB",
        last / 1024,
        total / 1024
    );
    assert!(
        growth < BOUND_KIB,
        "the edge grew by {growth} KiB holding a stalled stream"
    );

    // Now read: everything arrives, complete and in order.
    let expected = pattern(SIZE);
    for i in 0..MESSAGES {
        let frame = client
            .read_message()
            .await
            .unwrap_or_else(|| panic!("stream ended at message {i}"));
        assert_eq!(frame.opcode, 2, "message {i}");
        assert!(frame.payload == expected, "message {i} corrupted");
    }
    assert_eq!(upstream.flooded.load(Ordering::SeqCst), total);
    let peak_after = edge.memory_kib("VmHWM");
    println!("edge peak RSS after draining 100 MiB: {peak_after} KiB");
    assert!(
        peak_after.saturating_sub(baseline) < BOUND_KIB,
        "peak grew to {peak_after} KiB"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_upstream_holds_the_edge_to_a_bounded_memory_too() {
    let upstream = Upstream::start().await;
    let text = config(&upstream.url("/ws/chat"), "message_rate = \"off\"");
    let edge = EdgeProcess::start(&text, &[]).await;
    let baseline = edge.memory_kib("VmRSS");
    let mut client = alice(&edge, "").await;
    client.send_text("freeze").await;
    // The client pushes 100 MiB at an upstream that reads nothing; its writes must stall.
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sent_in_task = sent.clone();
    let writer = tokio::spawn(async move {
        let payload = pattern(SIZE);
        for _ in 0..MESSAGES {
            client.send_frame(true, 2, &payload).await;
            sent_in_task.fetch_add(SIZE as u64, Ordering::SeqCst);
        }
    });
    let last = stalled(&sent, "the client").await;
    assert!(
        last < (MESSAGES * SIZE) as u64 / 2,
        "backpressure did not stop the client: {last} bytes"
    );
    let growth = edge.memory_kib("VmHWM").saturating_sub(baseline);
    println!(
        "client stalled after {} KiB; edge grew by {growth} KiB",
        last / 1024
    );
    assert!(growth < BOUND_KIB, "the edge grew by {growth} KiB");
    writer.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_detached_session_holds_no_more_than_its_resume_bounds() {
    let mut upstream = Upstream::start().await;
    let text = config(
        &upstream.url("/ws/chat"),
        r#"resume = { window = "30s", max_messages = 100000, max_bytes = "2MiB" }"#,
    );
    let edge = EdgeProcess::start(&text, &[]).await;
    let baseline = edge.memory_kib("VmRSS");
    let mut client = alice(&edge, "&session_id=big").await;
    upstream.next_request().await;
    client.send_text(&format!("flood {MESSAGES} {SIZE}")).await;
    // Gone without a word: the session keeps reading the upstream for a resume, until what it
    // holds passes 2 MiB; then it cannot be resumed and ends.
    client.vanish();
    assert_eq!(
        upstream.next_close().await,
        Some((1001, "client went away".to_owned()))
    );
    // (Until the upstream answers that close, the edge reads and drops what it still sends.)
    let growth = edge.memory_kib("VmHWM").saturating_sub(baseline);
    println!("a detached session overflowed at 2 MiB; edge grew by {growth} KiB");
    // 2 MiB kept, a read chunk over it, the bytes in flight to the client that vanished.
    assert!(growth < 8 * 1024, "the edge grew by {growth} KiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_pings_and_reads_nothing_is_stopped_too() {
    let upstream = Upstream::start().await;
    let edge = EdgeProcess::start(&config(&upstream.url("/ws/chat"), ""), &[]).await;
    let baseline = edge.memory_kib("VmRSS");
    let mut client = alice(&edge, "").await;
    // Every ping is answered; a client that never reads its pongs must stop being read.
    let mut writer = client.take_writer();
    let sent = std::sync::Arc::new(AtomicU64::new(0));
    let sent_in_task = sent.clone();
    let pinger = tokio::spawn(async move {
        let payload = [7u8; 125];
        while writer.send_frame(9, &payload).await {
            sent_in_task.fetch_add(131, Ordering::SeqCst);
        }
    });
    let last = stalled(&sent, "the pinging client").await;
    let growth = edge.memory_kib("VmHWM").saturating_sub(baseline);
    println!(
        "pings stalled after {} KiB; edge grew by {growth} KiB",
        last / 1024
    );
    assert!(last < 64 << 20, "{last} bytes of pings were read");
    assert!(growth < BOUND_KIB, "the edge grew by {growth} KiB");
    pinger.abort();
    drop(client);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http_client_that_reads_nothing_holds_the_edge_to_a_bounded_memory() {
    let upstream = common::plain::HttpUpstream::start("a").await;
    let text = EdgeConfig::new(&upstream.url("/api"))
        .path("/api")
        .route("match = \"prefix\"\nhttp = \"proxy\"")
        .build();
    let edge = EdgeProcess::start(&text, &[]).await;
    let baseline = edge.memory_kib("VmRSS");
    let total = (MESSAGES * SIZE) as u64;
    let authorization = format!("Bearer {}", token_for("alice"));
    let mut client = common::plain::HttpClient::connect(edge.addr).await;
    let response = client
        .send(common::plain::get(
            &format!("/api/big?bytes={total}"),
            &[("authorization", &authorization)],
        ))
        .await;
    assert_eq!(response.status(), 200);
    // The client takes nothing of the body: the upstream's writes must stall.
    let last = stalled(&upstream.streamed, "the HTTP upstream").await;
    assert!(
        last < total / 2,
        "backpressure did not stop the upstream: {last} of {total} bytes"
    );
    let growth = edge.memory_kib("VmHWM").saturating_sub(baseline);
    println!(
        "HTTP upstream stalled after {} KiB of {} KiB; edge grew by {growth} KiB",
        last / 1024,
        total / 1024
    );
    assert!(growth < BOUND_KIB, "the edge grew by {growth} KiB");
    // Then the whole body arrives, intact and in order.
    let mut body = response.into_body();
    let mut received = 0usize;
    while let Some(chunk) = common::plain::next_chunk(&mut body).await {
        let expected = (received..received + chunk.len()).map(|i| (i % 251) as u8);
        assert!(
            chunk.iter().copied().eq(expected),
            "the body was altered near byte {received}"
        );
        received += chunk.len();
    }
    assert_eq!(received as u64, total);
}
