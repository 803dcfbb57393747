//! The real binary as a process: a command run to completion ([`wsedge`]), or the edge itself
//! ([`EdgeProcess`]) started from config text on port 0 and reporting the ports it bound the
//! way systemd hears it (`READY=1` with its status on a notify socket the test owns). Its log
//! goes to a file, its memory is read from /proc, and it is killed when the test ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

use super::{WAIT, eventually};

pub const BIN: &str = env!("CARGO_BIN_EXE_wsedge");
/// How long a short-lived command (`check`, `token`) may take before the test fails.
pub const COMMAND_WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Commands run to completion

/// A finished command: exit status and everything it printed.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// `wsedge` with these arguments, to be run to completion.
pub struct WsedgeCommand {
    command: Command,
    description: String,
    timeout: Duration,
}

pub fn wsedge(args: &[&str]) -> WsedgeCommand {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    WsedgeCommand {
        command,
        description: format!("wsedge {args:?}"),
        timeout: COMMAND_WAIT,
    }
}

impl WsedgeCommand {
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.command.env(name, value);
        self
    }

    pub fn env_remove(mut self, name: &str) -> Self {
        self.command.env_remove(name);
        self
    }

    pub fn current_dir(mut self, dir: &Path) -> Self {
        self.command.current_dir(dir);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs it, reading what it prints as it goes; fails the test after the timeout (the
    /// process is killed then).
    pub async fn run(mut self) -> Run {
        let child = self.command.spawn().expect("cannot start wsedge");
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} did not exit within {:?}",
                    self.description, self.timeout
                )
            })
            .expect("wsedge's output");
        Run {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// [`WsedgeCommand::run`] for a test without a runtime of its own.
    pub fn run_blocking(self) -> Run {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(self.run())
    }
}

// ---------------------------------------------------------------------------------------------
// The edge as a process

pub struct EdgeProcess {
    /// The first listen address, as bound.
    pub addr: SocketAddr,
    /// The admin listener, when the config has one.
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    notify: UnixDatagram,
    child: Child,
}

impl EdgeProcess {
    /// Writes `config` (with `{dir}` filled in) and starts `wsedge --config` on it with a
    /// notify socket of the test's, returning once the edge says it is ready.
    pub async fn start(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let text = config.replace("{dir}", dir.path().to_str().unwrap());
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, text).unwrap();
        let log_path = dir.path().join("wsedge.log");
        let notify_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("--config")
            .arg(&config_path)
            .env("NOTIFY_SOCKET", &notify_path)
            // The config says what is logged (a RUST_LOG of the test run's would override it).
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().expect("cannot start wsedge");
        let mut edge = EdgeProcess {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: None,
            dir,
            config_path,
            log_path,
            notify,
            child,
        };
        let ready = edge.next_notification("READY=1").await;
        let status = ready
            .lines()
            .find_map(|line| line.strip_prefix("STATUS=serving on "))
            .unwrap_or_else(|| panic!("READY=1 without the addresses: {ready:?}"));
        let (listen, admin) = match status.split_once(" (admin on ") {
            Some((listen, admin)) => (listen, Some(admin.trim_end_matches(')'))),
            None => (status, None),
        };
        let first = listen.split(", ").next().unwrap_or(listen);
        edge.addr = first.parse().expect("a listen address");
        edge.admin = admin.map(|admin| admin.parse().expect("the admin address"));
        edge
    }

    /// The next notification that has a line `wanted`, skipping others; fails the test if the
    /// process exits first or it does not come within `WAIT`.
    pub async fn next_notification(&mut self, wanted: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let message = self.notification(deadline, wanted).await;
            if message.lines().any(|line| line == wanted) {
                return message;
            }
        }
    }

    /// The next notification other than a watchdog keep-alive (within `WAIT`).
    pub async fn next_status(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let message = self.notification(deadline, "a status").await;
            if message.trim() != "WATCHDOG=1" {
                return message;
            }
        }
    }

    /// The next notification, whatever it says; `awaited` names what the test waits for.
    async fn notification(&mut self, deadline: tokio::time::Instant, awaited: &str) -> String {
        let mut buffer = [0u8; 4096];
        let received = tokio::select! {
            received = tokio::time::timeout_at(deadline, self.notify.recv(&mut buffer)) => received,
            status = self.child.wait() => panic!(
                "wsedge exited with {status:?} before {awaited}:\n{}",
                self.log()
            ),
        };
        let n = received
            .unwrap_or_else(|_| panic!("no {awaited} within {WAIT:?}:\n{}", self.log()))
            .expect("the notify socket");
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    }

    /// Waits for `count` `WATCHDOG=1` keep-alives (each within `WAIT`).
    pub async fn watchdog_keepalives(&mut self, count: usize) {
        for _ in 0..count {
            self.next_notification("WATCHDOG=1").await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the edge is running")
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{path_and_query}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `text` (fails the test after `WAIT`).
    pub async fn wait_log(&self, text: &str) {
        eventually(WAIT, &format!("the log saying {text:?}"), || async {
            self.log().contains(text)
        })
        .await;
    }

    /// Replaces the config file (`{dir}` filled in as at start).
    pub fn rewrite_config(&self, config: &str) {
        let text = config.replace("{dir}", self.dir.path().to_str().unwrap());
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// A field of /proc/PID/status in KiB (e.g. "VmRSS", "VmHWM").
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit, failing the test after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("the edge's exit status"),
            Err(_) => panic!("wsedge did not exit within {timeout:?}:\n{}", self.log()),
        }
    }
}
