//! A real browser (Debian's Chromium, driven by playwright-core; the README's test command
//! installs both)
//! against `wsedge demo`: the page sends its token as a `bearer.` subprotocol entry — the only
//! way a browser can without putting it in the URL — the chat core streams an answer, the
//! browser's TCP connection is cut in the middle of it, and the page resumes and gets the rest.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::process::BIN;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn a_browser_connects_with_a_subprotocol_token_and_resumes_after_a_cut() {
    let browser_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    assert!(
        std::path::Path::new(browser_dir)
            .join("node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run the README's test command (./test.sh), which installs it with Chromium"
    );
    // Killed when the test ends, however it ends.
    let mut demo = Command::new(BIN)
        .args(["demo", "--port", "0", "--page-port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot start wsedge demo");
    // The demo prints its addresses, runs its own check, then serves until stopped.
    let stdout = demo.stdout.take().expect("the demo's stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut page, mut edge_port) = (None, None);
    let started = tokio::time::Instant::now();
    loop {
        let line = tokio::time::timeout_at(started + Duration::from_secs(60), lines.next_line())
            .await
            .expect("the demo did not start in time")
            .expect("the demo's output")
            .expect("the demo ended before it was ready");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["edge", url, ..] => {
                edge_port = url
                    .trim_start_matches("ws://")
                    .split(['/', ':'])
                    .nth(1)
                    .map(str::to_owned);
            }
            ["page", url, ..] => page = Some(url.to_string()),
            _ => {}
        }
        if line.contains("Ctrl-C to stop") {
            break;
        }
    }
    let (page, edge_port) = (
        page.expect("the demo printed its page"),
        edge_port.expect("the demo printed its edge"),
    );

    let browser = Command::new("node")
        .arg(format!("{browser_dir}/resume.js"))
        .args([&page, &edge_port])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), browser)
        .await
        .expect("the browser did not finish in time")
        .expect("node runs (apt-get install nodejs, or the machine's own)");
    let printed = String::from_utf8_lossy(&output.stdout);
    let failed = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{printed}\n{failed}");
    assert!(
        printed.contains("status: the chat core sees user alice, tenant acme"),
        "{printed}"
    );
    assert!(
        printed.contains("closed: 1006"),
        "the cut was not seen:\n{printed}"
    );
    assert!(
        printed.contains("status: resumed: nothing missed"),
        "{printed}"
    );
    // Every word once, in order, across the cut.
    assert!(
        printed.contains(
            "log: > hello Hello alice! This answer is streamed word by word by the chat core, and every word crossed wsedge, which checked your token and told the core who you are."
        ),
        "{printed}"
    );
}
