//! A real browser (Debian's Chromium, driven by playwright-core; `.ci/run` installs both)
//! against `wsedge demo`: the page sends its token as a `bearer.` subprotocol entry — the only
//! way a browser can without putting it in the URL — the chat core streams an answer, the
//! browser's TCP connection is cut in the middle of it, and the page resumes and gets the rest.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::BIN;

/// Kills the demo when the test ends, however it ends.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_browser_connects_with_a_subprotocol_token_and_resumes_after_a_cut() {
    let browser_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    assert!(
        std::path::Path::new(browser_dir)
            .join("node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: npm ci --prefix tests/browser (and apt-get install chromium); .ci/run does both"
    );
    let mut demo = Demo(
        Command::new(BIN)
            .args(["demo", "--port", "0", "--page-port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start wsedge demo"),
    );
    // The demo prints its addresses, runs its own check, then serves until stopped.
    let stdout = demo.0.stdout.take().expect("the demo's stdout");
    let (mut page, mut edge_port) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("the demo's output");
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
        assert!(Instant::now() < deadline, "the demo did not start in time");
    }
    let (page, edge_port) = (
        page.expect("the demo printed its page"),
        edge_port.expect("the demo printed its edge"),
    );

    let output = Command::new("node")
        .arg(format!("{browser_dir}/resume.js"))
        .args([&page, &edge_port])
        .output()
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
