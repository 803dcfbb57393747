//! wsedge: a WebSocket reverse proxy and authentication edge for real-time chat.
//!
//! The binary is a thin shell over [`Edge`]: tests bind it on port 0, drive it with real
//! sockets, and stop it through the same cancellation token the signal handlers use.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod config;
pub mod demo;
pub mod handshake;
pub mod limits;
pub mod metrics;
pub mod query;
pub mod refusal;
pub mod relay;
pub mod route;
pub mod server;
pub mod session;
pub mod stats;
pub mod systemd;
pub mod template;
pub mod tls;
pub mod units;
pub mod upstream;
pub mod ws;

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, ConfigError};
pub use server::{Edge, EdgeHandle};
pub use stats::Stats;

/// State shared by every connection of one running edge.
pub struct Shared {
    /// The live config; handshakes load it once each, so a reload affects only new connections.
    pub config: ArcSwap<Config>,
    pub stats: Arc<Stats>,
    /// Cancelled when the edge begins to drain; relays close their clients with 1001.
    pub shutdown: CancellationToken,
    /// Every connection task, so that shutdown can wait for them all.
    pub tasks: TaskTracker,
    /// One permit per proxied connection, sized by `server.max_connections`.
    pub connection_slots: Arc<Semaphore>,
    /// One permit per connection that has not upgraded yet, sized by
    /// `server.max_pending_handshakes`: slow or silent clients cannot pile up unbounded.
    pub handshake_slots: Arc<Semaphore>,
    pub user_connections: Arc<limits::UserConnections>,
    pub handshake_rate: Option<limits::HandshakeRate>,
    pub metrics: Arc<metrics::Metrics>,
    pub(crate) audit: audit::AuditLog,
    /// Resumable sessions, live and recently ended.
    pub(crate) sessions: Arc<session::Sessions>,
}
