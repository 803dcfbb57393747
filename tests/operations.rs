//! Running the edge: /metrics moving with traffic, /healthz and /readyz through a drain, the
//! JSONL audit log, SIGHUP reloads (good and broken), SIGTERM within drain_timeout, the
//! systemd notify protocol, and the unit file.

mod common;

use std::time::{Duration, Instant};

use common::process::{BIN, EdgeProcess};
use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const ROUTE: &str = "route=\"/ws/chat\"";

#[tokio::test]
async fn metrics_follow_refusals_connections_messages_and_closes() {
    let (_upstream, edge) = start_edge(|c| c).await;
    let (status, text) = edge.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains("# TYPE wsedge_audit_dropped counter"),
        "{text}"
    );

    connect_refused(&edge.url("/ws/chat"), &[]).await;
    connect_refused(&edge.url("/ws/chat"), &[]).await;
    connect_refused(&edge.url("/nowhere"), &[]).await;
    let handshakes = |status: u16, reason: &str, route: &str| {
        format!(
            "wsedge_handshakes_total{{route=\"{route}\",status=\"{status}\",reason=\"{reason}\"}}"
        )
    };
    assert_eq!(
        edge.metric(&handshakes(401, "token_missing", "/ws/chat"))
            .await,
        Some(2.0)
    );
    assert_eq!(
        edge.metric(&handshakes(404, "no_route", "-")).await,
        Some(1.0)
    );
    assert!(
        edge.admin_get("/metrics")
            .await
            .1
            .contains("# TYPE wsedge_handshakes counter")
    );

    let mut ws = connect_ok(
        &edge.url(&format!("/ws/chat?token={}", token_for("alice"))),
        &[],
    )
    .await;
    assert_eq!(
        edge.metric(&handshakes(101, "ok", "/ws/chat")).await,
        Some(1.0)
    );
    assert_eq!(
        edge.metric(&format!("wsedge_open_connections{{{ROUTE}}}"))
            .await,
        Some(1.0)
    );
    assert_eq!(
        edge.metric(&format!("wsedge_upstream_connect_seconds_count{{{ROUTE}}}"))
            .await,
        Some(1.0)
    );
    for text in ["one", "two", "three"] {
        ws.send(Message::text(text)).await.unwrap();
        assert_eq!(next_text(&mut ws).await, text);
    }
    let direction = |name: &str, direction: &str| {
        format!("wsedge_{name}_total{{{ROUTE},direction=\"{direction}\"}}")
    };
    edge.wait_metric(&direction("messages", "client_to_upstream"), 3.0)
        .await;
    edge.wait_metric(&direction("messages", "upstream_to_client"), 3.0)
        .await;
    assert_eq!(
        edge.metric(&direction("bytes", "client_to_upstream")).await,
        Some(11.0)
    );

    ws.close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "done".into(),
    }))
    .await
    .unwrap();
    drop(ws);
    edge.wait_idle().await;
    edge.wait_metric(&format!("wsedge_open_connections{{{ROUTE}}}"), 0.0)
        .await;
    edge.wait_metric("wsedge_closes_total{side=\"upstream\",code=\"4000\"}", 1.0)
        .await;
    edge.wait_metric(
        &format!("wsedge_session_duration_seconds_count{{{ROUTE}}}"),
        1.0,
    )
    .await;
}

#[tokio::test]
async fn limit_hits_are_counted_by_kind() {
    let (_upstream, edge) =
        start_edge(|c| c.route("message_rate = { per_second = 1, burst = 1 }")).await;
    let mut raw = RawClient::connect(
        edge.addr,
        &format!("/ws/chat?token={}", token_for("alice")),
        &[],
    )
    .await;
    raw.send_text("one").await;
    raw.send_text("two").await;
    assert_eq!(raw.read_close_code().await, Some(1008));
    edge.wait_metric("wsedge_limit_hits_total{kind=\"message_rate\"}", 1.0)
        .await;
    edge.wait_metric("wsedge_closes_total{side=\"client\",code=\"1008\"}", 1.0)
        .await;
}

#[tokio::test]
async fn readyz_fails_as_soon_as_a_drain_begins_while_healthz_stays_up() {
    let (_upstream, edge) = start_edge(|c| c).await;
    assert_eq!(edge.admin_get("/readyz").await, (200, "ready\n".to_owned()));
    assert_eq!(edge.admin_get("/healthz").await, (200, "ok\n".to_owned()));
    // A client that never answers the edge's close keeps the drain going for a while.
    let raw = RawClient::connect(
        edge.addr,
        &format!("/ws/chat?token={}", token_for("alice")),
        &[],
    )
    .await;
    edge.handle.shutdown();
    assert_eq!(edge.admin_get("/readyz").await.0, 503);
    assert_eq!(edge.admin_get("/healthz").await.0, 200);
    // The listener is closed: new clients go to another instance.
    eventually(WAIT, "the listener closing for the drain", || async {
        tokio::net::TcpStream::connect(edge.addr).await.is_err()
    })
    .await;
    edge.wait_idle().await;
    drop(raw);
}

#[tokio::test]
async fn the_audit_log_has_one_json_line_per_event_and_no_token() {
    let (_upstream, edge) = start_edge(|c| c.log("audit = \"{dir}/audit.jsonl\"")).await;
    let audit = edge.dir.path().join("audit.jsonl");
    let token = hs256(&claims("alice", serde_json::json!({ "tenant_id": "acme" })));

    let bad = format!("{token}x");
    connect_refused(
        &edge.url(&format!("/ws/chat?token={bad}&planted=PLANTED-QUERY-VALUE")),
        &[],
    )
    .await;
    let url = edge.url(&format!(
        "/ws/chat?token={token}&conversation_id=c42&planted=PLANTED-QUERY-VALUE"
    ));
    let mut ws = connect_ok(&url, &[("x-request-id", "req-audit-1")]).await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello");
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    drop(ws);
    edge.wait_idle().await;

    let lines = audit_lines(&audit, 3).await;
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(
        !text.contains(&token) && !text.contains(token.rsplit('.').next().unwrap()),
        "a token reached the audit log"
    );
    assert!(
        !text.contains("PLANTED-QUERY-VALUE") && !text.contains("planted="),
        "a raw query reached the audit log"
    );

    let refusal = &lines[0];
    assert_eq!(refusal["event"], "refusal");
    assert_eq!(refusal["status"], 401);
    assert_eq!(refusal["reason"], "token_invalid");
    assert_eq!(refusal["route"], "/ws/chat");
    assert!(
        refusal["client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(refusal["time"].as_str().unwrap().ends_with('Z'));

    let connect = &lines[1];
    assert_eq!(connect["event"], "connect");
    assert_eq!(connect["request_id"], "req-audit-1");
    assert_eq!(
        (connect["user"].as_str(), connect["tenant"].as_str()),
        (Some("alice"), Some("acme"))
    );
    assert_eq!(connect["conversation"], "c42");
    assert_eq!(connect["status"], 101);

    let disconnect = &lines[2];
    assert_eq!(disconnect["event"], "disconnect");
    assert_eq!(disconnect["request_id"], "req-audit-1");
    assert_eq!(disconnect["user"], "alice");
    assert_eq!(disconnect["ended_by"], "client");
    assert_eq!(disconnect["upstream_close"], 4000);
    assert_eq!(
        (
            disconnect["messages_up"].as_u64(),
            disconnect["bytes_up"].as_u64()
        ),
        (Some(1), Some(5))
    );
    assert_eq!(
        (
            disconnect["messages_down"].as_u64(),
            disconnect["bytes_down"].as_u64()
        ),
        (Some(1), Some(5))
    );
    assert!(disconnect["duration_ms"].is_u64());
}

/// The binary's config for these tests: a short drain so that SIGTERM tests stay quick.
fn edge_config(upstream: &str) -> EdgeConfig {
    EdgeConfig::new(upstream).server("drain_timeout = \"1s\"")
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_swaps_the_upstream_for_new_connections_and_keeps_open_ones() {
    let mut first = Upstream::start().await;
    let mut second = Upstream::start().await;
    let edge = EdgeProcess::start(&edge_config(&first.url("/ws/chat")).build(), &[]).await;
    let url = edge.url(&format!("/ws/chat?token={}", token_for("alice")));
    let mut open = connect_ok(&url, &[]).await;
    first.next_request().await;

    edge.rewrite_config(&edge_config(&second.url("/ws/chat")).build());
    edge.signal("HUP");
    edge.wait_log("config reloaded").await;

    open.send(Message::text("still on the first"))
        .await
        .unwrap();
    assert_eq!(next_text(&mut open).await, "still on the first");
    let mut new = connect_ok(&url, &[]).await;
    second.next_request().await;
    assert_eq!(
        first.handshakes_so_far(),
        0,
        "the new connection went to the old upstream"
    );
    new.send(Message::text("on the second")).await.unwrap();
    assert_eq!(next_text(&mut new).await, "on the second");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_with_a_broken_config_keeps_serving_the_old_one() {
    let mut upstream = Upstream::start().await;
    let edge = EdgeProcess::start(&edge_config(&upstream.url("/ws/chat")).build(), &[]).await;
    let url = edge.url(&format!("/ws/chat?token={}", token_for("alice")));
    let mut open = connect_ok(&url, &[]).await;
    upstream.next_request().await;

    let broken = edge_config(&upstream.url("/ws/chat"))
        .auth("missing")
        .build();
    let line = 1 + broken
        .lines()
        .position(|line| line == "auth = \"missing\"")
        .expect("the route's auth line");
    edge.rewrite_config(&broken);
    edge.signal("HUP");
    edge.wait_log("reload refused").await;
    let log = edge.log();
    assert!(
        log.contains(&format!(
            "proxy.toml:{line}:8: route names auth policy \"missing\""
        )),
        "{log}"
    );

    open.send(Message::text("untouched")).await.unwrap();
    assert_eq!(next_text(&mut open).await, "untouched");
    let mut new = connect_ok(&url, &[]).await;
    upstream.next_request().await;
    new.send(Message::text("old config serves")).await.unwrap();
    assert_eq!(next_text(&mut new).await, "old config serves");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_clients_with_1001_and_exits_0_within_drain_timeout() {
    let upstream = Upstream::start().await;
    let mut edge = EdgeProcess::start(&edge_config(&upstream.url("/ws/chat")).build(), &[]).await;
    let token = token_for("alice");
    let mut polite = RawClient::connect(edge.addr, &format!("/ws/chat?token={token}"), &[]).await;
    // This one never reads, so it never answers the edge's close: only drain_timeout ends it.
    let _stubborn = RawClient::connect(edge.addr, &format!("/ws/chat?token={token}"), &[]).await;
    let started = Instant::now();
    edge.signal("TERM");
    assert_eq!(polite.read_close_code().await, Some(1001));
    let status = edge.wait_exit(WAIT).await;
    assert!(status.success(), "exit status {status}");
    // Not the default drain_timeout of 30 s, and not forever.
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "drain_timeout is 1s, exit took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_notify_ready_reloading_stopping_and_watchdog() {
    let upstream = Upstream::start().await;
    // The harness is systemd here: it owns the notify socket, and reads READY=1 (with the
    // addresses in STATUS) before it returns.
    let mut edge = EdgeProcess::start(
        &edge_config(&upstream.url("/ws/chat")).build(),
        &[("WATCHDOG_USEC", "200000")],
    )
    .await;
    // READY=1 comes after the listeners are bound: connecting right away must work.
    tokio::net::TcpStream::connect(edge.addr)
        .await
        .expect("listening when READY=1 arrives");

    // Around a reload, in this order: RELOADING=1 (with the time systemd 253+ asks for), then
    // READY=1 again.
    edge.signal("HUP");
    let reloading = edge.next_status().await;
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1"),
        "{reloading:?}"
    );
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading:?}"
    );
    let reloaded = edge.next_status().await;
    assert!(reloaded.lines().any(|l| l == "READY=1"), "{reloaded:?}");

    // At 200 ms the keep-alive goes every 100 ms.
    edge.watchdog_keepalives(3).await;

    edge.signal("TERM");
    let stopping = edge.next_status().await;
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(edge.wait_exit(WAIT).await.success());
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/wsedge.service"
    ))
    .unwrap();
    for required in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "LimitNOFILE=1048576",
        "LoadCredential=",
        "WatchdogSec=",
    ] {
        assert!(unit.contains(required), "the unit lacks {required}");
    }
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsedge.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/wsedge", BIN)).unwrap();
    let output = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is needed (Debian package systemd; ./test.sh installs it)");
    assert!(
        output.status.success(),
        "systemd-analyze verify failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
