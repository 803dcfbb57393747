//! A CI-sized run of every mode of `wsedge-load` through the edge, so the benchmark tool keeps
//! working. No timing is asserted: only that each mode completes without errors and reports
//! what it was asked to do.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::free_port;
use common::*;

const LOAD: &str = env!("CARGO_BIN_EXE_wsedge-load");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn run_load(args: &[&str]) -> serde_json::Value {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output =
        tokio::task::spawn_blocking(move || Command::new(LOAD).args(&args).output().unwrap())
            .await
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
    let port = free_port();
    let upstream = Killed(
        Command::new(LOAD)
            .args(["upstream", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the load tool's upstream did not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let config = basic_config(
        &format!("ws://127.0.0.1:{port}/ws"),
        "",
        "message_rate = \"off\"",
    )
    .replace(
        "[server]\n",
        "[server]\nmax_connections_per_user = 0\nhandshake_rate_per_ip = \"off\"\n",
    );
    let edge = TestEdge::start(&config).await;
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
        (idle["opened"].as_u64(), idle["errors"].as_u64()),
        (Some(30), Some(0)),
        "{idle}"
    );

    // Without a token the edge refuses, and the tool says so.
    let refused = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            Command::new(LOAD)
                .args(["handshake", "--url", &url, "--count", "3"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let result: serde_json::Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert_eq!(result["errors"].as_u64(), Some(3), "{result}");
    assert!(
        result["first_error"].as_str().unwrap().contains("401"),
        "{result}"
    );

    edge.wait_idle().await;
    drop(upstream);
}
