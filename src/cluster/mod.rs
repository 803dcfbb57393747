//! Several edges sharing one Redis (`[cluster]`): per-user connection limits held across all of
//! them ([`leases`]), disconnects and revocations that reach every edge ([`events`]), and the
//! directory of which edge holds each resumable session ([`directory`]), so that a client
//! coming back through another edge is carried to its session over the edge-to-edge link
//! ([`wire`]).
//!
//! Nothing here is on the path of an edge that stands alone, and nothing a handshake needs
//! waits on Redis longer than `redis_timeout`: revocations are checked against a local copy,
//! and while Redis is down `on_redis_down` decides at once. Live sockets never depend on it.

pub(crate) mod directory;
pub(crate) mod events;
pub(crate) mod leases;
mod revoked;
pub(crate) mod wire;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ProtocolVersion, PushInfo};
use tokio::sync::mpsc;

use crate::config::settings::{ClusterSettings, RedisDown};
use crate::connections::Connections;
use crate::metrics::{Metrics, OpLabels, ResultLabels};
use crate::revocation::Revocations;
use crate::session::registry::Sessions;
use crate::shutdown::Shutdown;
use leases::LeaseBook;

/// Every key the edges write starts with this.
const PREFIX: &str = "wsedge:";
/// While Redis is down, how often it is tried again.
const PROBE_WHILE_DOWN: Duration = Duration::from_secs(1);
/// How often the revocations are read back whole (besides after every reconnect): what a
/// published event that an edge missed costs at most.
const RESYNC_EVERY: Duration = Duration::from_secs(60);

pub(crate) struct Cluster {
    pub(crate) settings: Arc<ClusterSettings>,
    /// The connection of the thread that made the cluster (its housekeeping).
    redis: ConnectionManager,
    /// What each worker thread's own connection is made from.
    client: redis::Client,
    manager: ConnectionManagerConfig,
    /// Receives the other edges' events (re-subscribing after each reconnect).
    subscriber: ConnectionManager,
    /// This process among the edges: the node's name and a random part, so that the leases
    /// and sessions of an edge that restarted under the same name are not taken for its own.
    pub(crate) instance: String,
    /// Where the other edges reach this edge's link (`host:port`).
    pub(crate) advertise: String,
    up: AtomicBool,
    /// Events may have been missed (Redis was away, or dropped the subscription): the edge
    /// subscribes again, writes what waits, and reads the revocations back. Cleared only when
    /// that is done.
    resync_due: AtomicBool,
    leases: Arc<LeaseBook>,
    pushes: std::sync::Mutex<Option<mpsc::UnboundedReceiver<PushInfo>>>,
    pub(crate) metrics: Arc<Metrics>,
    revocations: Arc<Revocations>,
    connections: Arc<Connections>,
    sessions: Arc<Sessions>,
    /// The link requests this edge took lately, so that none is taken twice.
    pub(crate) taken_links: wire::TakenRequests,
    /// Revocations and lifts made here while Redis was down, written when it is back.
    pending: std::sync::Mutex<Vec<events::What>>,
    /// Where they are kept across a restart (in the state directory, when there is one).
    pending_file: Option<PathBuf>,
    /// Sessions begun here whose directory entry has yet to reach Redis.
    unannounced: std::sync::Mutex<Vec<Arc<crate::session::registry::SessionKey>>>,
}

thread_local! {
    /// Each thread's connections to Redis, by the cluster instance they belong to (one in a
    /// running edge; tests run several edges in one process).
    static THREAD_REDIS: std::cell::RefCell<Vec<(String, ConnectionManager)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A Redis call that gave no answer to use, for the caller that must decide without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unreachable {
    /// Redis is away (or cannot serve: loading, read-only, refusing this edge's credentials).
    Away,
    /// Redis answered with an error of the call's own (a script or type error).
    Refused,
}

/// Whether an error means Redis cannot serve the edge now (rather than refusing one call).
fn is_away(error: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            ErrorKind::AuthenticationFailed
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::NoPerm
                )
        )
}

impl Cluster {
    /// The cluster as `settings` describe it; Redis is reached lazily (an edge starts, and
    /// serves under `on_redis_down`, while Redis is down). `link_port` is where the link
    /// listener was bound; `state_dir` keeps what waits for Redis across a restart.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        settings: Arc<ClusterSettings>,
        link_port: u16,
        state_dir: Option<&Path>,
        metrics: Arc<Metrics>,
        revocations: Arc<Revocations>,
        connections: Arc<Connections>,
        sessions: Arc<Sessions>,
    ) -> redis::RedisResult<Self> {
        let patience = Some(settings.redis_timeout.max(Duration::from_secs(1)));
        let config = || {
            ConnectionManagerConfig::new()
                .set_connection_timeout(patience)
                .set_response_timeout(patience)
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1))
        };
        let client = redis::Client::open(settings.redis.clone())?;
        let redis = ConnectionManager::new_lazy_with_config(client.clone(), config())?;
        // The subscription has a connection of its own: on a subscribed RESP3 connection this
        // edge's own publications come back as pushes between the answers of its calls.
        let info = settings.redis.clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let subscriber = ConnectionManager::new_lazy_with_config(
            redis::Client::open(info.set_redis_settings(resp3))?,
            config()
                .set_push_sender(push_tx)
                .set_automatic_resubscription(),
        )?;
        let advertise = settings
            .advertise
            .clone()
            .unwrap_or_else(|| format!("{}:{link_port}", settings.link.ip()));
        let instance = format!(
            "{}.{}",
            settings.node,
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let (pending_file, pending) = revoked::load_pending(state_dir);
        Ok(Self {
            leases: Arc::new(LeaseBook::new(instance.clone())),
            settings,
            client,
            manager: config(),
            redis,
            subscriber,
            instance,
            advertise,
            up: AtomicBool::new(false),
            resync_due: AtomicBool::new(true),
            pushes: std::sync::Mutex::new(Some(push_rx)),
            metrics,
            revocations,
            connections,
            sessions,
            taken_links: wire::TakenRequests::default(),
            pending: std::sync::Mutex::new(pending),
            pending_file,
            unannounced: std::sync::Mutex::default(),
        })
    }

    /// Whether Redis answered the last call made to it.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether a handshake on an authenticated route is refused now: Redis is down and the
    /// policy is "closed" (counted; the log said so when Redis went down).
    pub(crate) fn refuses_while_down(&self) -> bool {
        if self.is_up() {
            return false;
        }
        let result = match self.settings.on_redis_down {
            RedisDown::Open => "open",
            RedisDown::Closed => "closed",
        };
        self.metrics
            .cluster
            .redis_down_decisions
            .get_or_create(&ResultLabels { result })
            .inc();
        self.settings.on_redis_down == RedisDown::Closed
    }

    fn mark(&self, up: bool) {
        let was = self.up.swap(up, Ordering::Relaxed);
        self.metrics.cluster.redis_up.set(i64::from(up));
        if !up {
            self.resync_due.store(true, Ordering::Relaxed);
        }
        if was != up {
            if up {
                tracing::info!(node = %self.settings.node, "cluster: Redis answers again");
            } else {
                let policy = match self.settings.on_redis_down {
                    RedisDown::Open => {
                        "open: per-user limits hold per edge, revocations as last known"
                    }
                    RedisDown::Closed => {
                        "closed: handshakes on authenticated routes get 503 until it is back"
                    }
                };
                tracing::warn!(node = %self.settings.node, on_redis_down = policy, "cluster: Redis cannot be reached; live connections are not touched");
            }
        }
    }

    /// Runs a Redis call on this thread's connection within `redis_timeout`, keeping track of
    /// whether Redis answers. A call that finds its connection dropped (Redis restarted, or
    /// this thread has not used it since) is made once more, on the connection the manager
    /// makes again meanwhile.
    pub(crate) async fn call<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, Unreachable>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let attempts = async {
            match call(self.redis()).await {
                Err(error) if error.is_connection_dropped() || error.is_io_error() => {
                    call(self.redis()).await
                }
                done => done,
            }
        };
        match tokio::time::timeout(self.settings.redis_timeout, attempts).await {
            Ok(Ok(value)) => {
                self.mark(true);
                Ok(value)
            }
            Ok(Err(error)) => {
                self.count_error(op);
                if is_away(&error) {
                    self.mark(false);
                    Err(Unreachable::Away)
                } else {
                    // Redis answered: the error is the call's own. Say what it was, and go
                    // on counting Redis as up.
                    self.mark(true);
                    tracing::error!(op, error = %error, "cluster: Redis refused a call");
                    Err(Unreachable::Refused)
                }
            }
            Err(_) => {
                self.count_error(op);
                self.mark(false);
                Err(Unreachable::Away)
            }
        }
    }

    /// Runs a prepared script as [`Cluster::call`] runs a call.
    pub(crate) async fn invoke<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Unreachable> {
        self.call(op, |mut redis| async move {
            invocation.invoke_async(&mut redis).await
        })
        .await
    }

    fn count_error(&self, op: &'static str) {
        self.metrics
            .cluster
            .redis_errors
            .get_or_create(&OpLabels { op })
            .inc();
    }

    /// A connection to Redis driven by the calling thread's event loop: a handshake's call
    /// does not wait for another thread to send it and to hand its answer back.
    fn redis(&self) -> ConnectionManager {
        THREAD_REDIS.with(|connections| {
            let mut connections = connections.borrow_mut();
            if let Some((_, connection)) = connections
                .iter()
                .find(|(instance, _)| *instance == self.instance)
            {
                return connection.clone();
            }
            match ConnectionManager::new_lazy_with_config(self.client.clone(), self.manager.clone())
            {
                Ok(connection) => {
                    connections.push((self.instance.clone(), connection.clone()));
                    connection
                }
                // Made the same way as the first one, which was made: it cannot fail; if it
                // ever did, that one serves.
                Err(_) => self.redis.clone(),
            }
        })
    }

    /// The cluster's housekeeping until the edge shuts down: renews this edge's leases and
    /// sessions, receives the other edges' events, writes what waited for Redis, and reads
    /// the revocations back after a reconnect and every minute.
    pub(crate) async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let pushes = self
            .pushes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some(pushes) = pushes else {
            return;
        };
        let listener = tokio::spawn(self.clone().listen(pushes));
        let releaser = tokio::spawn(self.clone().release_leases());
        let renew_every = self.settings.node_ttl / 3;
        let mut since_resync = Duration::ZERO;
        loop {
            if self.probe().await {
                let due = self.resync_due.load(Ordering::Relaxed);
                // Subscribed again after every outage: the subscription's connection is made
                // again when it is next used, and a reconnect tried while Redis was still
                // away leaves it unmade.
                let subscribed = !due
                    || self
                        .call("subscribe", |_| async {
                            self.subscriber.clone().subscribe(events::CHANNEL).await
                        })
                        .await
                        .is_ok();
                let renewed = self.renew().await;
                // A lift still waiting would be undone by what Redis holds: written first.
                if subscribed
                    && renewed
                    && (due || since_resync >= RESYNC_EVERY)
                    && self.write_pending().await
                {
                    // Cleared first: an outage during the read-back makes it due again.
                    self.resync_due.store(false, Ordering::Relaxed);
                    if self.resync_revocations().await {
                        since_resync = Duration::ZERO;
                    } else {
                        self.resync_due.store(true, Ordering::Relaxed);
                    }
                }
            }
            let wait = if self.is_up() {
                renew_every
            } else {
                PROBE_WHILE_DOWN
            };
            since_resync += wait;
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => break,
            }
        }
        listener.abort();
        releaser.abort();
    }

    /// Whether Redis answers a PING now.
    pub(crate) async fn probe(&self) -> bool {
        self.call("ping", |mut redis| async move {
            redis::cmd("PING").query_async::<()>(&mut redis).await
        })
        .await
        .is_ok()
    }

    /// Renews every lease and session this edge holds; whether Redis took them all.
    async fn renew(&self) -> bool {
        let leases = self.renew_leases().await;
        let sessions = self.renew_sessions().await;
        leases && sessions
    }
}
