//! The JSONL audit log: one line per connect, refusal and disconnect.
//!
//! Events go through a bounded channel to a writer task, so writing never blocks a handshake
//! or a relay: when the writer falls behind (a full or slow disk), events are dropped and
//! counted in `wsedge_audit_dropped_total` rather than stalling traffic.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

const QUEUE: usize = 8192;

enum Message {
    Line(String),
    /// Close the file and open this one (SIGHUP: log rotation or a changed path).
    Reopen(Option<PathBuf>),
}

/// Who a connection is, as each of its audit lines names it: never a token, never a query.
#[derive(Debug, Serialize)]
pub(crate) struct Who {
    /// Written by [`AuditLog::record`], which may name another request (a resume's).
    #[serde(skip)]
    pub(crate) request_id: String,
    /// The route's label, or `-` before a route was found.
    pub(crate) route: String,
    /// The client's address.
    pub(crate) client: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) conversation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) session_id: Option<String>,
}

/// One line: the time, the event, the request, who, and what the event adds.
#[derive(Serialize)]
struct Line<'a, D> {
    time: String,
    event: &'static str,
    request_id: &'a str,
    #[serde(flatten)]
    who: &'a Who,
    #[serde(flatten)]
    details: D,
}

#[derive(Clone)]
pub(crate) struct AuditLog {
    tx: mpsc::Sender<Message>,
    enabled: Arc<AtomicBool>,
    dropped: Counter,
}

impl AuditLog {
    /// Starts the writer. The file is opened (append, create) before this returns, so that a
    /// path that cannot be written is an error at start-up rather than silence later.
    pub(crate) fn start(path: Option<PathBuf>, dropped: Counter) -> std::io::Result<Self> {
        let file = path.as_ref().map(open).transpose()?;
        let enabled = Arc::new(AtomicBool::new(file.is_some()));
        let (tx, rx) = mpsc::channel(QUEUE);
        // A thread of its own: a slow disk must not stall one of the runtime's workers.
        let writer_enabled = enabled.clone();
        std::thread::Builder::new()
            .name("wsedge-audit".into())
            .spawn(move || write_lines(rx, file, writer_enabled))?;
        Ok(Self {
            tx,
            enabled,
            dropped,
        })
    }

    /// Whether events are being written (callers skip building them otherwise).
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Records an event of `request_id` (usually `who`'s own): who, and the event's `details`
    /// (a struct of named fields). Never waits.
    pub(crate) fn record(
        &self,
        event: &'static str,
        request_id: &str,
        who: &Who,
        details: impl Serialize,
    ) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
            request_id,
            who,
            details,
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            self.dropped.inc();
            return;
        };
        text.push('\n');
        if self.tx.try_send(Message::Line(text)).is_err() {
            self.dropped.inc();
        }
    }

    /// Reopens the file (after rotation) or switches to a new path; waits only for queue space.
    pub(crate) async fn reopen(&self, path: Option<PathBuf>) {
        let _ = self.tx.send(Message::Reopen(path)).await;
    }
}

fn open(path: &PathBuf) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot open audit log {}: {e}", path.display()),
            )
        })
}

fn write_lines(
    mut rx: mpsc::Receiver<Message>,
    file: Option<std::fs::File>,
    enabled: Arc<AtomicBool>,
) {
    let mut out = file.map(std::io::BufWriter::new);
    while let Some(message) = rx.blocking_recv() {
        let mut next = Some(message);
        // Write everything queued, then flush once: one syscall per burst, not per event.
        while let Some(message) = next.take() {
            match message {
                Message::Line(line) => {
                    if let Some(writer) = out.as_mut()
                        && let Err(error) = writer.write_all(line.as_bytes())
                    {
                        tracing::error!(%error, "audit log write failed");
                    }
                }
                Message::Reopen(new_path) => {
                    if let Some(mut writer) = out.take() {
                        let _ = writer.flush();
                    }
                    out = match new_path.as_ref().map(open) {
                        Some(Ok(file)) => Some(std::io::BufWriter::new(file)),
                        Some(Err(error)) => {
                            tracing::error!(%error, "audit log not reopened; audit events are dropped until the next reload");
                            None
                        }
                        None => None,
                    };
                    enabled.store(out.is_some(), Ordering::Relaxed);
                }
            }
            next = rx.try_recv().ok();
        }
        if let Some(writer) = out.as_mut()
            && let Err(error) = writer.flush()
        {
            tracing::error!(%error, "audit log flush failed");
        }
    }
}
