//! What a running edge shares between its connections.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::config::Config;
use crate::connections::Connections;
use crate::limits::{HandshakeRate, UserConnections};
use crate::metrics::Metrics;
use crate::revocation::Revocations;
use crate::route::Router;
use crate::session::registry::Sessions;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// The config being served and the routes built from it, swapped whole on reload: a handshake
/// loads it once and sees one generation throughout.
pub(crate) struct Live {
    pub(crate) config: Config,
    pub(crate) router: Router,
}

impl Live {
    pub(crate) fn new(config: Config) -> Self {
        let router = Router::new(&config.routes);
        Self { config, router }
    }
}

/// State shared by every connection of one running edge.
pub(crate) struct Shared {
    /// New handshakes use what is here; a reload affects only new connections.
    pub(crate) live: ArcSwap<Live>,
    pub(crate) stats: Arc<Stats>,
    /// Cancelled when the edge begins to drain; relays close their clients with 1001.
    pub(crate) shutdown: Shutdown,
    /// Every connection task, so that shutdown can wait for them all.
    pub(crate) tasks: TaskTracker,
    /// One permit per proxied connection, sized by `server.max_connections`.
    pub(crate) connection_slots: Arc<Semaphore>,
    /// One permit per connection that has not upgraded yet, sized by
    /// `server.max_pending_handshakes`: slow or silent clients cannot pile up unbounded.
    pub(crate) handshake_slots: Arc<Semaphore>,
    pub(crate) user_connections: Arc<UserConnections>,
    pub(crate) handshake_rate: Option<HandshakeRate>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) audit: AuditLog,
    /// Resumable sessions, live and recently ended.
    pub(crate) sessions: Arc<Sessions>,
    /// The WebSocket connections open now, for the admin API.
    pub(crate) connections: Arc<Connections>,
    /// Revoked tokens and users.
    pub(crate) revocations: Arc<Revocations>,
}
