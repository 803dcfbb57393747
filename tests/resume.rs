//! Session resume: a client whose connection is cut mid-stream comes back with `session_id` and
//! `last_seq` and receives exactly the rest, over the same upstream connection; every session
//! that cannot be resumed is reported (4002 and a reason, or the `edge.session` announcement),
//! never silently replaced.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const RESUME: &str = r#"resume = { window = "5s", max_messages = 50000, max_bytes = "4MiB" }"#;

fn path(token: &str, session: &str, last_seq: Option<usize>) -> String {
    match last_seq {
        None => format!("/ws/chat?token={token}&session_id={session}"),
        Some(n) => format!("/ws/chat?token={token}&session_id={session}&last_seq={n}"),
    }
}

async fn detached(edge: &TestEdge, count: f64) {
    edge.wait_metric("wsedge_sessions_detached", count).await;
}

/// The next data frame as text (answering pings on the way); panics on anything else.
async fn next_text_raw(client: &mut RawClient) -> String {
    let frame = client
        .read_answering_pings()
        .await
        .expect("a frame, not the end of the connection");
    assert_eq!(
        frame.opcode,
        1,
        "expected a text frame, got opcode {} ({:?})",
        frame.opcode,
        String::from_utf8_lossy(&frame.payload)
    );
    String::from_utf8(frame.payload).unwrap()
}

/// Reads until a close frame, answers it as a client library would, and returns its code
/// and reason.
async fn close_of(client: &mut RawClient) -> (u16, String) {
    loop {
        let frame = client
            .read_answering_pings()
            .await
            .expect("a close frame, not the end of the connection");
        if frame.opcode == 8 {
            let code = frame.close_code().expect("a close code");
            client.send_frame(true, 8, &frame.payload[..2]).await;
            return (
                code,
                String::from_utf8_lossy(&frame.payload[2..]).into_owned(),
            );
        }
    }
}

/// Receives `from..to` in order, each exactly once.
async fn expect_numbers(client: &mut RawClient, from: usize, to: usize) {
    for expected in from..to {
        assert_eq!(next_text_raw(client).await, expected.to_string());
    }
}

/// Connects as alice to `session` and asks the upstream for `command`, then for its close
/// ("answer complete") right after it.
async fn ask_for_an_answer(
    edge: &TestEdge,
    upstream: &mut Upstream,
    session: &str,
    command: &str,
) -> RawClient {
    let mut client =
        RawClient::connect(edge.addr, &path(&token_for("alice"), session, None), &[]).await;
    upstream.next_request().await;
    client.send_text(command).await;
    client.send_text("close 4000 answer complete").await;
    client
}

/// Waits until the upstream has closed after its answer (and the edge has answered it).
async fn answer_complete(upstream: &mut Upstream) {
    assert_eq!(
        upstream.next_close().await.map(|(code, _)| code),
        Some(4000)
    );
}

/// Receives `from..to`, then the upstream's close ("answer complete"), after which the
/// session is gone.
async fn expect_rest_then_close(client: &mut RawClient, edge: &TestEdge, from: usize, to: usize) {
    expect_numbers(client, from, to).await;
    assert_eq!(close_of(client).await, (4000, "answer complete".to_owned()));
    edge.wait_idle().await;
    detached(edge, 0.0).await;
}

/// The upstream connection the client is talking to, as the upstream numbers it.
async fn upstream_connection(client: &mut RawClient) -> String {
    client.send_text("conn").await;
    next_text_raw(client).await
}

async fn cut_and_resume(cut: usize) {
    const TOTAL: usize = 20_000;
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let mut first =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "s-1", None), &[]).await;
    upstream.next_request().await;
    first.send_text(&format!("stream {TOTAL}")).await;
    expect_numbers(&mut first, 0, cut).await;
    if cut == TOTAL {
        // The client answered the pings behind what it read: only what came after the last
        // of them is kept.
        assert_eq!(upstream_connection(&mut first).await, "conn 1");
        edge.wait_metric_until("wsedge_resume_buffered_messages", |kept| kept < 1000.0)
            .await;
    }
    // No close frame: the TCP connection just ends, with whatever was in flight lost.
    first.vanish();
    detached(&edge, 1.0).await;

    // The count includes the "conn 1" answer when it was read.
    let received = if cut == TOTAL { cut + 1 } else { cut };
    let mut second = RawClient::connect(
        edge.addr,
        &path(&token_for("alice"), "s-1", Some(received)),
        &[],
    )
    .await;
    expect_numbers(&mut second, cut, TOTAL).await;
    // Live again, on the connection the upstream has had all along.
    assert_eq!(upstream_connection(&mut second).await, "conn 1");
    assert_eq!(
        upstream.handshakes_so_far(),
        0,
        "the upstream saw a new handshake"
    );
    assert_eq!(
        upstream.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    detached(&edge, 0.0).await;
    edge.wait_metric(
        "wsedge_resumes_total{route=\"/ws/chat\",outcome=\"resumed\"}",
        1.0,
    )
    .await;

    second.send_frame(true, 8, &1000u16.to_be_bytes()).await;
    assert_eq!(upstream.next_close().await, Some((1000, String::new())));
    edge.wait_idle().await;
    edge.wait_metric("wsedge_resume_buffered_messages", 0.0)
        .await;
    edge.wait_metric("wsedge_resume_buffered_bytes", 0.0).await;
}

#[tokio::test]
async fn a_cut_at_the_start_of_a_stream_loses_nothing() {
    cut_and_resume(0).await;
}

#[tokio::test]
async fn a_cut_in_the_middle_of_a_stream_loses_nothing_and_repeats_nothing() {
    cut_and_resume(12_345).await;
}

#[tokio::test]
async fn a_cut_after_the_whole_stream_resumes_with_nothing_to_replay() {
    cut_and_resume(20_000).await;
}

#[tokio::test]
async fn a_token_that_expires_mid_stream_is_renewed_by_a_resume_without_loss() {
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let short = hs256(&claims("alice", json!({ "exp": now() + 2 })));
    let mut first = RawClient::connect(edge.addr, &path(&short, "s-exp", None), &[]).await;
    upstream.next_request().await;
    first.send_text("trickle 40 100").await;
    let mut received = 0;
    let (code, _) = loop {
        let frame = first.read_answering_pings().await.expect("a frame");
        if frame.opcode == 8 {
            break (frame.close_code().unwrap(), ());
        }
        assert_eq!(frame.payload, received.to_string().as_bytes());
        received += 1;
    };
    assert_eq!(code, 4001);
    assert!(received < 40, "the token should expire mid-stream");
    // The stream goes on while the client renews its token; what it sends meanwhile is kept.
    edge.wait_metric_until("wsedge_resume_buffered_messages", |kept| kept >= 2.0)
        .await;

    let mut second = RawClient::connect(
        edge.addr,
        &path(&token_for("alice"), "s-exp", Some(received)),
        &[],
    )
    .await;
    expect_numbers(&mut second, received, 40).await;
    assert_eq!(upstream_connection(&mut second).await, "conn 1");
    assert_eq!(
        upstream.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn another_user_cannot_resume_and_learns_nothing() {
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let mut alice =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "shared", None), &[]).await;
    upstream.next_request().await;
    alice.send_text("stream 100").await;
    expect_numbers(&mut alice, 0, 10).await;
    alice.vanish();
    detached(&edge, 1.0).await;

    let mut mallory = RawClient::connect(
        edge.addr,
        &path(&token_for("mallory"), "shared", Some(10)),
        &[],
    )
    .await;
    let theirs = close_of(&mut mallory).await;
    let mut random = RawClient::connect(
        edge.addr,
        &path(&token_for("mallory"), "no-such", Some(10)),
        &[],
    )
    .await;
    let unknown = close_of(&mut random).await;
    // Word for word what a session that does not exist looks like.
    assert_eq!(theirs, (4002, "session unknown".to_owned()));
    assert_eq!(theirs, unknown);
    assert_eq!(upstream.handshakes_so_far(), 0);

    // Alice's session is untouched.
    let mut back = RawClient::connect(
        edge.addr,
        &path(&token_for("alice"), "shared", Some(10)),
        &[],
    )
    .await;
    expect_numbers(&mut back, 10, 100).await;
    assert_eq!(upstream_connection(&mut back).await, "conn 1");
}

#[tokio::test]
async fn a_session_whose_window_passed_is_reported_expired() {
    let (mut upstream, edge) = start_edge(|c| {
        c.route(r#"resume = { window = "300ms", max_messages = 100, max_bytes = "1MiB" }"#)
    })
    .await;
    let mut first =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "late", None), &[]).await;
    upstream.next_request().await;
    assert_eq!(upstream_connection(&mut first).await, "conn 1");
    first.vanish();
    // The upstream is let go when the window passes.
    assert_eq!(
        upstream.next_close().await,
        Some((1001, "client went away".to_owned()))
    );
    let mut late =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "late", Some(1)), &[]).await;
    assert_eq!(
        close_of(&mut late).await,
        (4002, "session expired".to_owned())
    );
    edge.wait_metric(
        "wsedge_resumes_total{route=\"/ws/chat\",outcome=\"expired\"}",
        1.0,
    )
    .await;
    detached(&edge, 0.0).await;
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_detached_session_that_overflows_its_buffer_ends_and_is_reported() {
    let (mut upstream, edge) = start_edge(|c| {
        c.route(r#"resume = { window = "10s", max_messages = 100, max_bytes = "1MiB" }"#)
    })
    .await;
    let mut first =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "big", None), &[]).await;
    upstream.next_request().await;
    first.send_text("stream 5000").await;
    first.vanish();
    // It cannot be resumed any more, so it does not wait for the window.
    assert_eq!(
        upstream.next_close().await,
        Some((1001, "client went away".to_owned()))
    );
    let mut back =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "big", Some(0)), &[]).await;
    assert_eq!(
        close_of(&mut back).await,
        (4002, "session overflowed".to_owned())
    );
    edge.wait_idle().await;
    edge.wait_metric("wsedge_resume_buffered_bytes", 0.0).await;
    edge.wait_metric("wsedge_limit_hits_total{kind=\"resume_buffer\"}", 1.0)
        .await;
}

#[tokio::test]
async fn a_live_session_refuses_what_does_not_fit_it_and_keeps_going() {
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let token = token_for("alice");
    let mut alice = RawClient::connect(
        edge.addr,
        &format!("{}&conversation_id=c1", path(&token, "s", None)),
        &[],
    )
    .await;
    upstream.next_request().await;
    assert_eq!(upstream_connection(&mut alice).await, "conn 1");

    let cases = [
        (path(&token, "s", None), "session in use"),
        (path(&token, "s", Some(999)), "last_seq ahead"),
        (
            format!("{}&conversation_id=c2", path(&token, "s", Some(1))),
            "session conversation differs",
        ),
    ];
    for (target, reason) in cases {
        let mut other = RawClient::connect(edge.addr, &target, &[]).await;
        assert_eq!(
            close_of(&mut other).await,
            (4002, reason.to_owned()),
            "{target}"
        );
    }
    // None of that disturbed the session or reached the upstream.
    assert_eq!(upstream_connection(&mut alice).await, "conn 1");
    assert_eq!(upstream.handshakes_so_far(), 0);
}

#[tokio::test]
async fn a_second_connection_takes_a_live_session_over() {
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let mut first =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "phone", None), &[]).await;
    upstream.next_request().await;
    first.send_text("stream 2000").await;
    expect_numbers(&mut first, 0, 500).await;
    // The phone moved to another network: its old socket is not dead yet as far as the edge knows.
    let mut second = RawClient::connect(
        edge.addr,
        &path(&token_for("alice"), "phone", Some(500)),
        &[],
    )
    .await;
    expect_numbers(&mut second, 500, 2000).await;
    assert_eq!(close_of(&mut first).await.0, 4003);
    assert_eq!(upstream_connection(&mut second).await, "conn 1");
}

#[tokio::test]
async fn two_takeovers_at_once_leave_one_connection_live_and_lose_nothing() {
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let mut first =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "phone", None), &[]).await;
    upstream.next_request().await;
    first.send_text("stream 2000").await;
    expect_numbers(&mut first, 0, 300).await;
    // Two resumes race for the session: each may win for a moment, but in the end one holds
    // it and has every message once; the other is told 4003.
    let again = path(&token_for("alice"), "phone", Some(300));
    let (mut a, mut b) = tokio::join!(
        RawClient::connect(edge.addr, &again, &[]),
        RawClient::connect(edge.addr, &again, &[])
    );
    let (a_first, b_first) = tokio::join!(a.read_answering_pings(), b.read_answering_pings());
    let mut live = Vec::new();
    for (client, frame) in [(a, a_first), (b, b_first)] {
        match frame {
            Some(frame) if frame.opcode == 1 => live.push((client, frame)),
            Some(frame) => assert_eq!(frame.close_code(), Some(4003)),
            None => panic!("a connection ended without a close frame"),
        }
    }
    // Each gets the messages from 300 in order until it is taken over (4003); the one that
    // holds the session at the end has them all, and the upstream's one connection.
    let mut winners = 0;
    for (mut client, frame) in live {
        assert_eq!(String::from_utf8(frame.payload).unwrap(), "300");
        let mut next = 301;
        let mut taken_over = false;
        while next < 2000 {
            match client.read_answering_pings().await {
                Some(frame) if frame.opcode == 1 => {
                    assert_eq!(String::from_utf8(frame.payload).unwrap(), next.to_string());
                    next += 1;
                }
                Some(frame) => {
                    assert_eq!(frame.close_code(), Some(4003));
                    taken_over = true;
                    break;
                }
                None => panic!("a connection ended without a close frame"),
            }
        }
        if taken_over {
            continue;
        }
        client.send_text("conn").await;
        match client.read_answering_pings().await {
            Some(frame) if frame.opcode == 1 => {
                assert_eq!(frame.payload, b"conn 1");
                winners += 1;
            }
            Some(frame) => assert_eq!(frame.close_code(), Some(4003)),
            None => panic!("a connection ended without a close frame"),
        }
    }
    assert_eq!(winners, 1, "exactly one connection holds the session");
    assert_eq!(close_of(&mut first).await.0, 4003);
    assert_eq!(upstream.handshakes_so_far(), 0);
}

#[tokio::test]
async fn a_takeover_drops_what_the_old_connection_left_unfinished() {
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let mut first =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "switch", None), &[]).await;
    upstream.next_request().await;
    // The old connection starts a message in fragments and is cut off in the middle of it.
    first.send_frame(false, 1, b"half of an old ").await;
    // Its ping's pong proves the edge has read (and is holding) the fragment.
    first.send_frame(true, 9, b"p").await;
    loop {
        let frame = first.read_frame().await.expect("a pong");
        if frame.opcode == 10 {
            break;
        }
    }
    first
        .send_frame_prefix(false, 0, b"message that never ends", 12)
        .await;
    let mut second = RawClient::connect(
        edge.addr,
        &path(&token_for("alice"), "switch", Some(0)),
        &[],
    )
    .await;
    // The new connection's own fragmented message reaches the upstream whole and alone: the
    // echo is exactly it.
    second.send_frame(false, 1, b"new ").await;
    second.send_frame(true, 0, b"message").await;
    assert_eq!(next_text_raw(&mut second).await, "new message");
    assert_eq!(upstream_connection(&mut second).await, "conn 1");
    assert_eq!(close_of(&mut first).await.0, 4003);
}

#[tokio::test]
async fn a_takeover_during_the_last_replay_still_gets_the_upstreams_close() {
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let gone = ask_for_an_answer(&edge, &mut upstream, "final", "trickle 20 20").await;
    gone.vanish();
    answer_complete(&mut upstream).await;
    detached(&edge, 1.0).await;
    // One connection resumes and takes nothing (a phone between networks)...
    let mut stalled =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "final", Some(0)), &[]).await;
    detached(&edge, 0.0).await;
    // ...and another takes over before the first has confirmed the rest.
    let mut back =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "final", Some(0)), &[]).await;
    expect_numbers(&mut back, 0, 20).await;
    assert_eq!(
        close_of(&mut back).await,
        (4000, "answer complete".to_owned())
    );
    assert_eq!(close_of(&mut stalled).await.0, 4003);
    edge.wait_idle().await;
}

#[tokio::test]
async fn an_upstream_close_that_meets_a_dead_link_waits_for_the_client_to_come_back() {
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let mut first = ask_for_an_answer(&edge, &mut upstream, "tunnel", "stream 3000").await;
    // The answer and its close left the edge while the phone's link was already dead: it
    // read 100 messages, and its pongs never arrive.
    for expected in 0..100 {
        let frame = first.read_ignoring_pings().await.expect("a message");
        assert_eq!(frame.payload, expected.to_string().as_bytes());
    }
    answer_complete(&mut upstream).await;
    first.vanish();
    detached(&edge, 1.0).await;
    let mut back = RawClient::connect(
        edge.addr,
        &path(&token_for("alice"), "tunnel", Some(100)),
        &[],
    )
    .await;
    expect_rest_then_close(&mut back, &edge, 100, 3000).await;
}

#[tokio::test]
async fn the_upstreams_close_follows_the_last_confirmation_even_behind_a_ping() {
    // Heartbeats at their default (30 s): nothing but the confirmation may wake the edge.
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let mut client = ask_for_an_answer(&edge, &mut upstream, "pingy", "stream 5").await;
    answer_complete(&mut upstream).await;
    let mut received = 0;
    let code = loop {
        let frame = client.read_frame().await.expect("the rest, then the close");
        match frame.opcode {
            1 => received += 1,
            // Each confirmation comes with a ping of the client's own (as some libraries
            // send theirs), so the edge has a pong to write when it learns it may close.
            9 => {
                client
                    .send_frames_at_once(&[(9, b"mine"), (10, &frame.payload)])
                    .await
            }
            10 => {}
            8 => {
                client.send_frame(true, 8, &frame.payload[..2]).await;
                break frame.close_code();
            }
            other => panic!("opcode {other}"),
        }
    };
    assert_eq!((received, code), (5, Some(4000)));
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_clean_close_ends_the_session_at_once() {
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let mut first =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "done", None), &[]).await;
    upstream.next_request().await;
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    first.send_frame(true, 8, &close).await;
    assert_eq!(upstream.next_close().await, Some((1000, "bye".to_owned())));
    edge.wait_idle().await;
    let mut again =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "done", Some(0)), &[]).await;
    assert_eq!(
        close_of(&mut again).await,
        (4002, "session closed".to_owned())
    );
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_detached_and_can_come_back() {
    let (mut upstream, edge) = start_edge(|c| {
        c.route("ping_interval = \"200ms\"\npong_timeout = \"200ms\"")
            .route(RESUME)
    })
    .await;
    let mut first =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "quiet", None), &[]).await;
    upstream.next_request().await;
    // It reads nothing, so it answers no ping.
    detached(&edge, 1.0).await;
    assert_eq!(close_of(&mut first).await.0, 1001);
    let mut back =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "quiet", Some(0)), &[]).await;
    assert_eq!(upstream_connection(&mut back).await, "conn 1");
}

#[tokio::test]
async fn the_announcement_tells_the_client_what_happened_to_its_session() {
    let (mut upstream, edge) = start_edge(|c| c.route(r#"resume = { window = "5s", max_messages = 10000, max_bytes = "4MiB", announce = true }"#)).await;
    // No session_id: the edge names one.
    let mut first = RawClient::connect(
        edge.addr,
        &format!("/ws/chat?token={}", token_for("alice")),
        &[],
    )
    .await;
    upstream.next_request().await;
    let hello: Value = serde_json::from_str(&next_text_raw(&mut first).await).unwrap();
    assert_eq!(hello["type"], "edge.session");
    assert_eq!(hello["resumed"], false);
    let id = hello["session_id"].as_str().unwrap().to_owned();
    first.send_text("stream 100").await;
    expect_numbers(&mut first, 0, 40).await;
    first.vanish();
    detached(&edge, 1.0).await;

    let mut second =
        RawClient::connect(edge.addr, &path(&token_for("alice"), &id, Some(40)), &[]).await;
    let back: Value = serde_json::from_str(&next_text_raw(&mut second).await).unwrap();
    assert_eq!(back["resumed"], true, "{back}");
    assert_eq!(back["session_id"], id.as_str());
    // The edge passed the client's one message ("stream 100") to the upstream.
    assert_eq!(back["received"], 1, "{back}");
    assert!(back["replayed"].as_u64().unwrap() <= 60, "{back}");
    expect_numbers(&mut second, 40, 100).await;

    // A session that is not there: told so, and started afresh with a new upstream connection.
    let mut third = RawClient::connect(
        edge.addr,
        &path(&token_for("alice"), "gone-long-ago", Some(7)),
        &[],
    )
    .await;
    let fresh: Value = serde_json::from_str(&next_text_raw(&mut third).await).unwrap();
    // A live session that cannot be resumed is not replaced: the real reason, with 4002.
    let mut ahead = RawClient::connect(
        edge.addr,
        &path(&token_for("alice"), &id, Some(10_000)),
        &[],
    )
    .await;
    assert_eq!(
        close_of(&mut ahead).await,
        (4002, "last_seq ahead".to_owned())
    );
    assert_eq!(
        fresh,
        json!({"type": "edge.session", "session_id": "gone-long-ago", "resumed": false, "reason": "session unknown"})
    );
    upstream.next_request().await;
    assert_eq!(upstream_connection(&mut third).await, "conn 2");
}

#[tokio::test]
async fn malformed_session_parameters_are_refused_before_the_upgrade() {
    let (_upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let token = token_for("alice");
    for query in [
        "session_id=a%20b",
        "session_id=a&session_id=b",
        "session_id=a&last_seq=-1",
        "session_id=a&last_seq=x",
        "session_id=a&last_seq=18446744073709551616",
        "last_seq=3",
        &format!("session_id={}", "a".repeat(10_000)),
    ] {
        let refused =
            connect_refused(&edge.url(&format!("/ws/chat?token={token}&{query}")), &[]).await;
        assert_eq!(refused.status, 400, "{query}");
        assert_eq!(refused.body["error"], "bad_handshake", "{query}");
    }
}

#[tokio::test]
async fn a_pong_frees_only_what_was_sent_before_its_ping() {
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let mut client =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "acks", None), &[]).await;
    upstream.next_request().await;
    // One message, and the edge's ping right behind it.
    assert_eq!(upstream_connection(&mut client).await, "conn 1");
    // Five more behind that ping, while it is unanswered: all six are kept.
    client.send_text("stream 5").await;
    edge.wait_metric("wsedge_resume_buffered_messages", 6.0)
        .await;
    let ping = client.read_frame().await.expect("the edge's ping");
    assert_eq!(ping.opcode, 9);
    client.send_frame(true, 10, &ping.payload).await;
    // The pong covers "conn 1" only.
    edge.wait_metric("wsedge_resume_buffered_messages", 5.0)
        .await;
    client.vanish();
    detached(&edge, 1.0).await;
    let mut back =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "acks", Some(1)), &[]).await;
    expect_numbers(&mut back, 0, 5).await;
}

#[tokio::test]
async fn an_upstream_that_closes_while_the_client_is_away_is_closed_after_the_replay() {
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let client = ask_for_an_answer(&edge, &mut upstream, "end", "trickle 20 20").await;
    client.vanish();
    detached(&edge, 1.0).await;
    // The upstream finished its answer and closed while nobody was there.
    answer_complete(&mut upstream).await;
    let mut back =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "end", Some(0)), &[]).await;
    expect_rest_then_close(&mut back, &edge, 0, 20).await;
}

#[tokio::test]
async fn detaching_and_resuming_are_in_the_audit_log() {
    let (_upstream, edge) =
        start_edge(|c| c.log("audit = \"{dir}/audit.jsonl\"").route(RESUME)).await;
    let audit = edge.dir.path().join("audit.jsonl");
    let token = token_for("alice");
    let mut first = RawClient::connect(edge.addr, &path(&token, "audited", None), &[]).await;
    assert_eq!(upstream_connection(&mut first).await, "conn 1");
    first.vanish();
    detached(&edge, 1.0).await;
    let mut second = RawClient::connect(edge.addr, &path(&token, "audited", Some(1)), &[]).await;
    assert_eq!(upstream_connection(&mut second).await, "conn 1");
    let mut third = RawClient::connect(edge.addr, &path(&token, "other", Some(1)), &[]).await;
    close_of(&mut third).await;

    let lines = audit_lines(&audit, 4).await;
    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["connect", "detach", "resume", "resume_refused"]);
    for line in &lines[..3] {
        assert_eq!(line["user"], "alice");
        assert_eq!(line["session_id"], "audited", "{line}");
    }
    assert_eq!(lines[1]["reason"], "client lost");
    assert_eq!(lines[2]["last_seq"], 1);
    assert_eq!(lines[3]["reason"], "session unknown");
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains(&token), "a token reached the audit log");
}

#[tokio::test]
async fn a_small_buffer_keeps_a_fast_stream_flowing_without_heartbeats() {
    // 50 messages of room, a stream of 100,000: only the client's pongs to the edge's pings make
    // room again, and with heartbeats off nothing else would.
    let (mut upstream, edge) = start_edge(|c| c.route("ping_interval = \"off\"\nresume = { window = \"5s\", max_messages = 50, max_bytes = \"4MiB\" }")).await;
    let mut client =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "tight", None), &[]).await;
    upstream.next_request().await;
    // One message with the edge's ping behind it; the stream arrives before the pong, so the
    // pong frees that one message only and the buffer stays full of the stream.
    assert_eq!(upstream_connection(&mut client).await, "conn 1");
    client.send_text("stream 100000").await;
    edge.wait_metric_until("wsedge_resume_buffered_messages", |kept| kept > 50.0)
        .await;
    expect_numbers(&mut client, 0, 100_000).await;
}

#[tokio::test]
async fn a_detached_session_keeps_what_it_held_beyond_its_bounds_when_the_client_left() {
    // One read can take a connected client's buffer past max_messages; that is not an overflow
    // as long as nothing more has to be kept.
    let (mut upstream, edge) = start_edge(|c| {
        c.route(r#"resume = { window = "5s", max_messages = 10, max_bytes = "4MiB" }"#)
    })
    .await;
    let mut first =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "over", None), &[]).await;
    upstream.next_request().await;
    // About 5 KB: the upstream writes it at once, and the edge reads it in one read.
    first.send_text("stream 1000").await;
    expect_numbers(&mut first, 0, 5).await;
    first.vanish();
    detached(&edge, 1.0).await;
    let mut back =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "over", Some(5)), &[]).await;
    expect_numbers(&mut back, 5, 1000).await;
}

#[tokio::test]
async fn endless_empty_fragments_from_a_client_are_stopped_with_1009() {
    let (mut upstream, edge) =
        start_edge(|c| c.route(&format!("max_message_size = \"16KiB\"\n{RESUME}"))).await;
    let client = RawClient::connect(edge.addr, &path(&token_for("alice"), "frag", None), &[]).await;
    upstream.next_request().await;
    // The edge would hold every fragment until the message is complete: each counts as a byte.
    assert_eq!(client.flood_empty_fragments().await, Some(1009));
}

#[tokio::test]
async fn a_replay_that_takes_longer_than_the_close_timeout_still_arrives_whole() {
    let (mut upstream, edge) = start_edge(|c| {
        c.route(r#"resume = { window = "30s", max_messages = 1000, max_bytes = "8MiB" }"#)
    })
    .await;
    let first = ask_for_an_answer(&edge, &mut upstream, "slow", "flood 64 65536").await;
    first.vanish();
    answer_complete(&mut upstream).await;
    let mut back =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "slow", Some(0)), &[]).await;
    // 4 MiB read at about 1 MiB/s: longer than the edge waits for a closing peer.
    let expected = pattern(65536);
    for i in 0..64 {
        let frame = back.read_message().await.expect("the replay");
        assert_eq!(frame.opcode, 2, "message {i}");
        assert!(frame.payload == expected, "message {i} corrupted");
        tokio::time::sleep(Duration::from_millis(70)).await;
    }
    assert_eq!(
        close_of(&mut back).await,
        (4000, "answer complete".to_owned())
    );
}

#[tokio::test]
async fn a_refused_handshake_does_not_keep_its_session_id() {
    let (_upstream, edge) =
        start_edge(|c| c.server("max_connections_per_user = 1").route(RESUME)).await;
    let token = token_for("alice");
    let mut first = RawClient::connect(edge.addr, &path(&token, "one", None), &[]).await;
    assert_eq!(upstream_connection(&mut first).await, "conn 1");
    // Over the per-user limit: refused after its session id was looked at.
    let refused = connect_refused(&edge.url(&path(&token, "two", None)), &[]).await;
    assert_eq!(refused.status, 429);
    first.send_frame(true, 8, &1000u16.to_be_bytes()).await;
    edge.wait_idle().await;
    // The id is free: a new session starts under it.
    let mut second = RawClient::connect(edge.addr, &path(&token, "two", None), &[]).await;
    assert_eq!(upstream_connection(&mut second).await, "conn 2");
}

#[tokio::test]
async fn a_drain_ends_detached_sessions_too() {
    let (mut upstream, edge) = start_edge(|c| c.route(RESUME)).await;
    let mut client =
        RawClient::connect(edge.addr, &path(&token_for("alice"), "away", None), &[]).await;
    upstream.next_request().await;
    assert_eq!(upstream_connection(&mut client).await, "conn 1");
    client.vanish();
    detached(&edge, 1.0).await;
    let started = std::time::Instant::now();
    edge.handle.shutdown();
    assert_eq!(
        upstream.next_close().await,
        Some((1001, "edge shutting down".to_owned()))
    );
    edge.wait_idle().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a detached session held the drain for {:?}",
        started.elapsed()
    );
}
