//! The real binary as a process: started from config text on a free loopback port, its log
//! captured to a file, its memory read from /proc, killed when the test ends.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::WAIT;

pub const BIN: &str = env!("CARGO_BIN_EXE_wsedge");

/// `basic_config` for the binary: it listens on the `{port}` that `EdgeProcess` fills in.
pub fn process_config(upstream: &str, server_extra: &str, route_extra: &str) -> String {
    super::basic_config(upstream, "", route_extra).replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"127.0.0.1:{{port}}\"]\n{server_extra}"),
    )
}

pub struct EdgeProcess {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Child,
}

/// A port that was free a moment ago (the binary binds what its config names).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

impl EdgeProcess {
    /// Writes `config` (with `{port}` and `{dir}` filled in) and starts `wsedge --config` on it,
    /// returning once the port accepts connections.
    pub async fn start(config: &str, env: &[(&str, &str)]) -> Self {
        let mut edge = Self::spawn(config, env);
        edge.wait_listening().await;
        edge
    }

    /// Starts the process without waiting for it to listen.
    pub fn spawn(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let text = config
            .replace("{port}", &port.to_string())
            .replace("{dir}", dir.path().to_str().unwrap());
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, text).unwrap();
        let log_path = dir.path().join("wsedge.log");
        let mut command = Command::new(BIN);
        command
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(&log_path).unwrap());
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().expect("cannot start wsedge");
        EdgeProcess {
            port,
            dir,
            config_path,
            log_path,
            child,
        }
    }

    pub async fn wait_listening(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "wsedge exited with {status} before listening:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "wsedge did not listen within {WAIT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://127.0.0.1:{}{path_and_query}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `text` (fails the test after `WAIT`).
    pub async fn wait_log(&self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "the log never said {text:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Replaces the config file (`{port}` and `{dir}` filled in as at start).
    pub fn rewrite_config(&self, config: &str) {
        let text = config
            .replace("{port}", &self.port.to_string())
            .replace("{dir}", self.dir.path().to_str().unwrap());
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
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit, failing the test after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "wsedge did not exit within {timeout:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
