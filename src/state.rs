//! What a running edge shares between its connections.

use std::io;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::connections::Connections;
use crate::limits::{HandshakeRate, PendingByAddress, UserConnections};
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

impl Shared {
    /// The state for serving `config`: revocations read back from its state folder, the audit
    /// log started, the cluster joined when there is one (`link_port`: where its link
    /// listener was bound).
    pub(crate) fn new(config: Config, link_port: Option<u16>) -> io::Result<Self> {
        let state_dir = config
            .admin
            .as_ref()
            .and_then(|admin| admin.state_dir.clone());
        let revocations = Revocations::load(state_dir.as_deref())
            .map_err(|error| io::Error::other(error.to_string()))?;
        let metrics = Arc::new(Metrics::new());
        let audit = AuditLog::start(config.log.audit.clone(), metrics.audit_dropped.clone())?;
        let sessions = Arc::new(Sessions {
            registry: Default::default(),
            metrics: metrics.clone(),
            audit: audit.clone(),
        });
        let revocations = Arc::new(revocations);
        let connections = Arc::new(Connections::default());
        let cluster = match &config.cluster {
            None => None,
            Some(settings) => Some(Arc::new(
                Cluster::new(
                    settings.clone(),
                    link_port.unwrap_or(settings.link.port()),
                    state_dir.as_deref(),
                    metrics.clone(),
                    revocations.clone(),
                    connections.clone(),
                    sessions.clone(),
                )
                .map_err(|error| io::Error::other(format!("cluster: {}", error.category())))?,
            )),
        };
        Ok(Self {
            cluster,
            metrics,
            audit,
            sessions,
            connections,
            revocations,
            connection_slots: Arc::new(Semaphore::new(config.server.max_connections)),
            handshake_slots: Arc::new(Semaphore::new(config.server.max_pending_handshakes)),
            pending_by_address: Arc::default(),
            user_connections: Arc::default(),
            handshake_rate: config.server.handshake_rate_per_ip.map(HandshakeRate::new),
            live: ArcSwap::from_pointee(Live::new(config)),
            stats: Arc::new(Stats::default()),
            shutdown: Shutdown::default(),
            tasks: TaskTracker::new(),
        })
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
    /// The same slots counted per address, against `server.max_pending_handshakes_per_ip`.
    pub(crate) pending_by_address: Arc<PendingByAddress>,
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
    /// The other edges, when this one is one of several.
    pub(crate) cluster: Option<Arc<Cluster>>,
}
