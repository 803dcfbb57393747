//! WebSocket conformance: the Autobahn test suite's cases (through the `kosoku` runner, pinned
//! by `test.sh`) drive the edge as a server, with an echo upstream behind it. Every case must
//! be OK or INFORMATIONAL, as Autobahn grades them, but for the few NON-STRICT by design. The compression cases
//! (12.*, 13.*) do not apply: no extension is negotiated through the edge.

mod common;

use common::*;

/// The Autobahn cases without compression.
const CASES: usize = 301;

/// The cases that may be NON-STRICT through the edge (README "What a client sees"): a good
/// message, then a broken frame. An echo server answers the good one before it reads the
/// broken one; the edge fails the client as soon as it reads the broken frame (RFC 6455
/// §7.1.7), before the upstream's answer has come back. Every other case must be OK.
const FAILED_AT_ONCE: &[&str] = &[
    "3.2", "3.3", "3.4", "4.1.3", "4.1.4", "4.1.5", "4.2.3", "4.2.4", "4.2.5", "5.15",
];

#[tokio::test(flavor = "multi_thread")]
async fn the_autobahn_cases_pass_through_the_edge() {
    let upstream = Upstream::start_mode(UpstreamMode::Echo).await;
    let config = EdgeConfig::new(&upstream.url("/"))
        .server("max_connections_per_user = 0\nhandshake_rate_per_ip = \"off\"")
        .path("/")
        .auth("none")
        .route("match = \"prefix\"\nmessage_rate = \"off\"\nmax_message_size = \"64MiB\"");
    let edge = TestEdge::start(&config.build()).await;
    let reports = tempfile::tempdir().unwrap();
    let mut runner = tokio::process::Command::new("kosoku");
    runner
        .args([
            "-m",
            "fuzzingclient",
            "-p",
            "2",
            "-x",
            "12.*",
            "-x",
            "13.*",
            "-o",
        ])
        .arg(reports.path())
        .arg(edge.addr.to_string())
        .kill_on_drop(true);
    let output = tokio::time::timeout(std::time::Duration::from_secs(300), runner.output())
        .await
        .expect("the Autobahn cases did not finish in 5 minutes")
        .expect("kosoku runs (pip install kosoku==0.1.0; ./test.sh does)");
    let printed = String::from_utf8_lossy(&output.stdout);

    let mut graded = 0;
    let mut failed = Vec::new();
    for entry in std::fs::read_dir(reports.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        let Ok(report) =
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(&path).unwrap())
        else {
            continue;
        };
        let Some(behavior) = report["behavior"].as_str() else {
            continue;
        };
        graded += 1;
        let close = report["behaviorClose"].as_str().unwrap_or("");
        let id = report["id"].as_str().unwrap_or_default();
        let passed = (matches!(behavior, "OK" | "INFORMATIONAL")
            || (behavior == "NON-STRICT" && FAILED_AT_ONCE.contains(&id)))
            && matches!(close, "OK" | "INFORMATIONAL");
        if !passed {
            failed.push(format!(
                "{}: {behavior}/{close}",
                path.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    assert_eq!(graded, CASES, "cases graded; kosoku printed:\n{printed}");
    assert!(failed.is_empty(), "failed: {failed:?}\n{printed}");
    edge.wait_idle().await;
}
