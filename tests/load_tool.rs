//! A CI-sized run of every mode of `wsedge-load` through the edge, so the benchmark tool keeps
//! working. No timing is asserted: only that each mode completes without errors and reports
//! what it was asked to do.

mod common;

use std::process::Stdio;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const LOAD: &str = env!("CARGO_BIN_EXE_wsedge-load");

async fn run_load(args: &[&str]) -> serde_json::Value {
    let run = Command::new(LOAD).args(args).kill_on_drop(true).output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), run)
        .await
        .expect("wsedge-load finished")
        .unwrap();
    assert!(
        output.status.success(),
        "wsedge-load failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let line = stdout.lines().last().expect("one JSON line");
    serde_json::from_str(line).expect("a JSON result")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_mode_runs_through_the_edge() {
    let mut upstream = Command::new(LOAD)
        .args([
            "upstream",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // It says where it listens once it does.
    let mut lines = BufReader::new(upstream.stderr.take().unwrap()).lines();
    let said = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the load tool's upstream did not start in time")
        .unwrap()
        .expect("a line from the load tool's upstream");
    let address = said
        .strip_prefix("upstream listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {said:?}"))
        .to_owned();
    let said = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the load tool's HTTP upstream did not start in time")
        .unwrap()
        .expect("a second line from the load tool's upstream");
    let http_address = said
        .strip_prefix("http upstream listening on ")
        .unwrap_or_else(|| panic!("unexpected second line: {said:?}"))
        .to_owned();
    let config = EdgeConfig::new(&format!("ws://{address}/ws"))
        .server("max_connections_per_user = 0\nhandshake_rate_per_ip = \"off\"")
        .route("message_rate = \"off\"")
        .section(&format!(
            "[[route]]\npath = \"/api\"\nmatch = \"prefix\"\nupstream = \"ws://{http_address}/api\"\nauth = \"main\"\nhttp = \"proxy\""
        ));
    let edge = TestEdge::start(&config.build()).await;
    let url = edge.url("/ws/chat");
    let common = ["--url", &url, "--jwt-secret", SECRET];

    let stream = run_load(
        &[
            &["stream"][..],
            &common,
            &["--connections", "4", "--messages", "300", "--size", "32"],
        ]
        .concat(),
    )
    .await;
    assert_eq!(
        (stream["received"].as_u64(), stream["errors"].as_u64()),
        (Some(1200), Some(0)),
        "{stream}"
    );

    let rtt = run_load(
        &[
            &["rtt"][..],
            &common,
            &["--connections", "4", "--round-trips", "50"],
        ]
        .concat(),
    )
    .await;
    assert_eq!(
        (rtt["completed"].as_u64(), rtt["errors"].as_u64()),
        (Some(200), Some(0)),
        "{rtt}"
    );
    assert!(
        rtt["latency_us"]["p99"].as_u64().unwrap() >= rtt["latency_us"]["p50"].as_u64().unwrap()
    );

    let handshakes = run_load(
        &[
            &["handshake"][..],
            &common,
            &["--count", "40", "--concurrency", "5"],
        ]
        .concat(),
    )
    .await;
    assert_eq!(
        (
            handshakes["completed"].as_u64(),
            handshakes["errors"].as_u64()
        ),
        (Some(40), Some(0)),
        "{handshakes}"
    );

    let idle = run_load(
        &[
            &["idle"][..],
            &common,
            &["--connections", "30", "--hold", "200ms", "--sources", "3"],
        ]
        .concat(),
    )
    .await;
    assert_eq!(
        (
            idle["opened"].as_u64(),
            idle["held"].as_u64(),
            idle["errors"].as_u64()
        ),
        (Some(30), Some(30), Some(0)),
        "{idle}"
    );

    let api = edge.url("/api/answer").replace("ws://", "http://");
    let requests = run_load(&[
        "http",
        "--url",
        &api,
        "--jwt-secret",
        SECRET,
        "--connections",
        "4",
        "--requests",
        "50",
    ])
    .await;
    assert_eq!(
        (requests["completed"].as_u64(), requests["errors"].as_u64()),
        (Some(200), Some(0)),
        "{requests}"
    );

    let sse = edge.url("/api/sse").replace("ws://", "http://");
    let events = run_load(&[
        "sse",
        "--url",
        &sse,
        "--jwt-secret",
        SECRET,
        "--connections",
        "3",
        "--events",
        "2000",
    ])
    .await;
    assert_eq!(
        (events["received"].as_u64(), events["errors"].as_u64()),
        (Some(6000), Some(0)),
        "{events}"
    );

    // Without a token the edge refuses, and the tool says so.
    let refused = Command::new(LOAD)
        .args(["handshake", "--url", &url, "--count", "3"])
        .kill_on_drop(true)
        .output();
    let refused = tokio::time::timeout(WAIT, refused).await.unwrap().unwrap();
    let result: serde_json::Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert_eq!(result["errors"].as_u64(), Some(3), "{result}");
    assert!(
        result["first_error"].as_str().unwrap().contains("401"),
        "{result}"
    );

    edge.wait_idle().await;
    drop(upstream);
}
