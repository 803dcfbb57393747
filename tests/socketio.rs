//! Socket.IO through the edge: python-socketio's client with its default transports (Engine.IO
//! long-polling, then the upgrade to a WebSocket) against python-socketio nodes, on loopback
//! (`tests/socketio/chat.py`; test.sh installs `tests/socketio/requirements.txt`).

mod common;

use std::process::Stdio;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/socketio/chat.py");
const ROUTE: &str = "route=\"/socket.io*\"";

/// A Socket.IO node; it ends with the test (its stdin closes) or when dropped.
struct Node {
    _process: Child,
    port: u16,
}

impl Node {
    async fn start(name: &str) -> Self {
        let mut process = Command::new("python3")
            .args([SCRIPT, "server", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let stdout = process.stdout.take().expect("piped stdout");
        let said = tokio::time::timeout(WAIT, BufReader::new(stdout).lines().next_line())
            .await
            .expect("the Socket.IO node did not start in time")
            .expect("its stdout")
            .expect("a line saying where it listens");
        let port = said
            .strip_prefix("listening ")
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {said:?}"));
        Node {
            _process: process,
            port,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/socket.io", self.port)
    }
}

/// An edge in front of `nodes`, proxying Socket.IO's HTTP and WebSocket requests.
async fn edge_for(nodes: &[&Node], affinity: &str) -> TestEdge {
    let urls: Vec<String> = nodes.iter().map(|node| node.url()).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let config = EdgeConfig::new(urls[0])
        .upstreams(&urls)
        .path("/socket.io")
        .route("match = \"prefix\"\nhttp = \"proxy\"")
        .route(affinity);
    TestEdge::start(&config.build()).await
}

/// Runs the Socket.IO client as `user` against the edge, sending `messages` chat events, with
/// `options` of chat.py's client; what it reports (one JSON object, with "error" if it failed).
async fn chat_as(edge: &TestEdge, user: &str, messages: usize, options: &[&str]) -> Value {
    let token = hs256(&claims(user, json!({ "tenant_id": "acme" })));
    let run = Command::new("python3")
        .args([
            SCRIPT,
            "client",
            &format!("http://{}", edge.addr),
            &token,
            &messages.to_string(),
        ])
        .args(options)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT * 4, run)
        .await
        .expect("the Socket.IO client did not finish in time")
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no report from the client: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"))
}

/// What a user who got through sees: greeted as themselves, every message answered in order
/// by one node, over `transport` by the end; the node's name.
fn node_of_a_good_session(report: &Value, user: &str, messages: usize, transport: &str) -> String {
    assert_eq!(report.get("error"), None, "{report}");
    let welcome = &report["welcome"];
    assert_eq!(welcome["user"], user, "{report}");
    assert_eq!(welcome["tenant"], "acme", "{report}");
    assert_eq!(welcome["token_seen"], false, "the token reached the node");
    assert_eq!(report["transport"], transport, "{report}");
    let node = welcome["node"].as_str().expect("a node name").to_owned();
    let replies = report["replies"].as_array().expect("replies");
    assert_eq!(replies.len(), messages, "{report}");
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply["text"], format!("message {i}"), "{report}");
        assert_eq!(reply["node"], node, "a session spread over nodes: {report}");
    }
    node
}

#[tokio::test]
async fn socket_io_polls_then_upgrades_through_the_edge() {
    let node = Node::start("a").await;
    let edge = edge_for(&[&node], "").await;
    let report = chat_as(&edge, "alice", 20, &[]).await;
    assert_eq!(
        node_of_a_good_session(&report, "alice", 20, "websocket"),
        "a"
    );
    // Both transports went through the edge: Engine.IO's open request (at least) as HTTP, the
    // upgrade as a socket.
    edge.wait_metric_until(
        &format!("wsedge_http_requests_total{{{ROUTE},status=\"200\"}}"),
        |count| count >= 1.0,
    )
    .await;
    edge.wait_metric(
        &format!("wsedge_handshakes_total{{{ROUTE},status=\"101\",reason=\"ok\"}}"),
        1.0,
    )
    .await;
    edge.wait_idle().await;
    // Without a token Engine.IO's first request is refused by the edge.
    let mut client = common::plain::HttpClient::connect(edge.addr).await;
    let refused = client
        .fetch(common::plain::get(
            "/socket.io/?EIO=4&transport=polling",
            &[],
        ))
        .await;
    assert_eq!(
        (refused.status, refused.json()["error"].as_str()),
        (401, Some("token_missing"))
    );
}

#[tokio::test]
async fn a_client_that_cannot_upgrade_chats_over_long_polling() {
    let node = Node::start("a").await;
    let edge = edge_for(&[&node], "").await;
    let options = ["--polling-only", "--token-in", "query"];
    let report = chat_as(&edge, "alice", 10, &options).await;
    assert_eq!(node_of_a_good_session(&report, "alice", 10, "polling"), "a");
    // Each message went up in a POST and its answer came down in a held GET.
    edge.wait_metric_until(
        &format!("wsedge_http_requests_total{{{ROUTE},status=\"200\"}}"),
        |count| count >= 20.0,
    )
    .await;
    edge.wait_metric(
        &format!("wsedge_handshakes_total{{{ROUTE},status=\"101\",reason=\"ok\"}}"),
        0.0,
    )
    .await;
    edge.wait_idle().await;
}

#[tokio::test]
async fn with_two_nodes_affinity_keeps_each_session_on_the_node_holding_its_sid() {
    let (a, b) = (Node::start("a").await, Node::start("b").await);
    let edge = edge_for(&[&a, &b], "affinity = \"user\"").await;
    // Where a user lands depends on the targets' URLs, whose ports differ from run to run: six
    // users share one node once in 32 runs. Users come in sixes until both nodes hold some
    // (four sixes leave one run in ten million on one node).
    let mut placed: Vec<(String, String)> = Vec::new();
    for batch in 0..4 {
        let users: Vec<String> = (0..6).map(|i| format!("user{batch}{i}")).collect();
        let sessions = users.iter().map(|user| chat_as(&edge, user, 5, &[]));
        let reports = futures_util::future::join_all(sessions).await;
        for (user, report) in users.into_iter().zip(&reports) {
            let node = node_of_a_good_session(report, &user, 5, "websocket");
            placed.push((user, node));
        }
        if placed.iter().any(|(_, node)| node != &placed[0].1) {
            break;
        }
    }
    let first = &placed[0];
    let Some(other) = placed.iter().find(|(_, node)| node != &first.1) else {
        panic!("{} users all on node {}", placed.len(), first.1);
    };
    // Each user comes back to their node, over the WebSocket or held to polling, request after
    // request.
    let polling = ["--polling-only", "--token-in", "query"];
    for (user, node) in [first, other] {
        let again = chat_as(&edge, user, 5, &[]).await;
        assert_eq!(&node_of_a_good_session(&again, user, 5, "websocket"), node);
        let polled = chat_as(&edge, user, 5, &polling).await;
        assert_eq!(&node_of_a_good_session(&polled, user, 5, "polling"), node);
    }
    edge.wait_idle().await;

    // Without affinity the requests of one session go round the nodes, and the node that did
    // not hand out the sid refuses it ("Session ID unknown"): what affinity is for.
    let edge = edge_for(&[&a, &b], "").await;
    let report = chat_as(&edge, "alice", 5, &["--wait", "3"]).await;
    assert!(
        report.get("error").is_some(),
        "a session across two nodes: {report}"
    );
    let refused_upgrades = edge
        .metric(&format!(
            "wsedge_handshakes_total{{{ROUTE},status=\"400\",reason=\"upstream_refused\"}}"
        ))
        .await
        .unwrap_or(0.0);
    let refused_polls = edge
        .metric(&format!(
            "wsedge_http_requests_total{{{ROUTE},status=\"400\"}}"
        ))
        .await
        .unwrap_or(0.0);
    assert!(
        refused_upgrades + refused_polls >= 1.0,
        "no node refused the session's sid"
    );
}
