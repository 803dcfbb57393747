//! Listeners, the accept loop, TLS termination, HTTP/1.1 (up to an upgrade, or request by
//! request on a keep-alive connection), and drain.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::admission::ClientConn;
use crate::auth::memo::TokenMemo;
use crate::config::{Config, ConfigError};
use crate::deadline::LazyDeadline;
use crate::dispatch;
use crate::fast_path::{self, HeadRead, Left, Reading};
use crate::limits::{PendingSlot, address_key};
use crate::metrics::Limit;
use crate::passthrough::body::ClientBody;
use crate::state::{Live, Shared};
use crate::stats::Stats;
use crate::ws::io::{Io, Rewind};

/// Pending connections the kernel queues per listening socket (tokio's default).
const LISTEN_BACKLOG: u32 = 1024;

/// A bound, not yet running edge.
pub struct Edge {
    shared: Arc<Shared>,
    /// For each worker, one socket per listen address: the kernel spreads new connections over
    /// them (SO_REUSEPORT), and a connection lives on the worker that accepted it.
    listeners: Vec<Vec<std::net::TcpListener>>,
    local_addrs: Vec<SocketAddr>,
    admin: Option<TcpListener>,
    /// Where the other edges of the cluster hand this edge's sessions their clients.
    link: Option<TcpListener>,
}

/// Controls a running edge from outside: stats, reload, shutdown.
#[derive(Clone)]
pub struct EdgeHandle {
    shared: Arc<Shared>,
}

impl EdgeHandle {
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Swaps in a validated config: new handshakes use it, open connections keep theirs.
    pub async fn reload(&self, config: Config) {
        let live = self.shared.live.load_full();
        let old = &live.config;
        if old.server.listen != config.server.listen {
            tracing::warn!("listen addresses changed; they take effect on restart, not on reload");
        }
        if old.admin.as_ref().map(|a| a.listen) != config.admin.as_ref().map(|a| a.listen) {
            tracing::warn!("the admin address changed; it takes effect on restart, not on reload");
        }
        let api = |config: &Config| config.admin.as_ref().is_some_and(|a| a.token.is_some());
        if api(&config) && !api(old) {
            tracing::warn!(
                "the admin API is on from now: connections opened before this reload are not listed and cannot be ended through it"
            );
        }
        if old.admin.as_ref().and_then(|a| a.state_dir.as_ref())
            != config.admin.as_ref().and_then(|a| a.state_dir.as_ref())
        {
            tracing::warn!(
                "the admin state_dir changed; it takes effect on restart, not on reload"
            );
        }
        if cluster_changed(old, &config) {
            tracing::warn!(
                "[cluster] changed; it takes effect on restart, not on reload (this edge stays in the cluster it joined)"
            );
        }
        if config.server.max_connections != old.server.max_connections
            || config.server.max_pending_handshakes != old.server.max_pending_handshakes
            || config.server.handshake_rate_per_ip != old.server.handshake_rate_per_ip
            || config.server.workers != old.server.workers
        {
            tracing::warn!(
                "max_connections, max_pending_handshakes, handshake_rate_per_ip and workers take effect on restart, not on reload"
            );
        }
        // Reopened even when unchanged, so that SIGHUP after log rotation moves to the new file.
        self.shared.audit.reopen(config.log.audit.clone()).await;
        // Key sets already fetched stay in use until the new refreshers have fetched again.
        crate::jwks_refresh::start(
            &config,
            Some(old),
            &self.shared.metrics,
            &self.shared.shutdown,
        );
        self.shared.live.store(Arc::new(Live::new(config)));
        self.shared.metrics.reload(true);
    }

    /// Reads, validates and swaps in the config at `path`; on any error the running config
    /// stays and the error is returned.
    pub async fn reload_from(&self, path: &std::path::Path) -> Result<(), ConfigError> {
        match Config::load(path) {
            Ok(config) => {
                for warning in &config.warnings {
                    tracing::warn!("{warning}");
                }
                self.reload(config).await;
                Ok(())
            }
            Err(error) => {
                self.shared.metrics.reload(false);
                Err(error)
            }
        }
    }

    /// Stops accepting, closes every client with 1001, and lets `run` return once all
    /// connections have closed or the drain timeout has passed.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }
}

/// A listener of the edge's own (not a serving one), its error naming what it is for.
async fn bind_named(address: SocketAddr, what: &str) -> io::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {address} ({what}): {e}"),
        )
    })
}

/// Whether `[cluster]` differs between two configs (its secret compared too, not printed).
fn cluster_changed(old: &Config, new: &Config) -> bool {
    match (&old.cluster, &new.cluster) {
        (None, None) => false,
        (Some(old), Some(new)) => {
            old.node != new.node
                || old.secret != new.secret
                || old.node_ttl != new.node_ttl
                || old.on_redis_down != new.on_redis_down
                || old.redis_timeout != new.redis_timeout
                || old.link != new.link
                || old.advertise != new.advertise
                || old.redis.addr() != new.redis.addr()
        }
        _ => true,
    }
}

impl Edge {
    /// Binds every listen address of the config.
    pub async fn bind(config: Config) -> io::Result<Edge> {
        let workers = config.server.workers;
        let mut listeners: Vec<Vec<std::net::TcpListener>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut local_addrs = Vec::new();
        for address in &config.server.listen {
            let in_use =
                |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {address}: {e}"));
            // SO_REUSEPORT would let this process share a port another process holds: a plain
            // bind first finds out whether it is free.
            if address.port() != 0 {
                drop(std::net::TcpListener::bind(address).map_err(in_use)?);
            }
            let mut bound = *address;
            for worker in listeners.iter_mut() {
                let socket = match bound {
                    SocketAddr::V4(_) => TcpSocket::new_v4(),
                    SocketAddr::V6(_) => TcpSocket::new_v6(),
                }?;
                socket.set_reuseaddr(true)?;
                socket.set_reuseport(true)?;
                socket.bind(bound).map_err(in_use)?;
                let listener = socket.listen(LISTEN_BACKLOG)?;
                // The first socket's port (when the config says 0) is every other one's.
                bound = listener.local_addr()?;
                worker.push(listener.into_std()?);
            }
            local_addrs.push(bound);
        }
        let admin = match &config.admin {
            None => None,
            Some(admin) => Some(bind_named(admin.listen, "admin").await?),
        };
        let link = match &config.cluster {
            None => None,
            Some(cluster) => Some(bind_named(cluster.link, "cluster link").await?),
        };
        let link_port = match &link {
            Some(link) => Some(link.local_addr()?.port()),
            None => None,
        };
        let shared = Arc::new(Shared::new(config, link_port)?);
        // Whether Redis answers decides the first handshakes; an edge starts either way.
        if let Some(cluster) = &shared.cluster
            && !cluster.probe().await
        {
            tracing::warn!(
                "cluster: Redis cannot be reached at start; serving under on_redis_down"
            );
        }
        Ok(Edge {
            shared,
            listeners,
            local_addrs,
            admin,
            link,
        })
    }

    /// The bound addresses (with real ports where the config said 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.local_addrs.clone()
    }

    /// The cluster link's address, when the edge is one of several.
    pub fn link_addr(&self) -> Option<SocketAddr> {
        self.link.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The admin listener's address, when the config has one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn handle(&self) -> EdgeHandle {
        EdgeHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until [`EdgeHandle::shutdown`], then drains.
    ///
    /// Connections are served by worker threads, each with an event loop of its own: a
    /// connection, both its sockets and its timer live on one thread from accept to close, so
    /// nothing is handed between threads on the way (BENCHMARKS.md compares this with one
    /// shared work-stealing runtime). This task keeps the admin listener and housekeeping.
    pub async fn run(self) {
        let shared = self.shared;
        let admin_stop = CancellationToken::new();
        if let Some(admin) = self.admin {
            tokio::spawn(crate::admin::serve(
                admin,
                shared.clone(),
                admin_stop.clone(),
            ));
        }
        if let Some(link) = self.link {
            tokio::spawn(crate::handoff::serve_link(
                link,
                shared.clone(),
                admin_stop.clone(),
            ));
        }
        if let Some(cluster) = &shared.cluster {
            tokio::spawn(cluster.clone().run(shared.shutdown.clone()));
        }
        let workers_stop = CancellationToken::new();
        let mut workers_done = Vec::new();
        for (index, listeners) in self.listeners.into_iter().enumerate() {
            let (done, finished) = tokio::sync::oneshot::channel::<()>();
            let shared = shared.clone();
            let stop = workers_stop.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("wsedge-worker-{index}"))
                .spawn(move || {
                    run_worker(listeners, shared, stop);
                    let _ = done.send(());
                });
            match spawned {
                Ok(_) => workers_done.push(finished),
                Err(error) => tracing::error!(%error, "cannot start a worker thread"),
            }
        }
        tokio::spawn(housekeeping(shared.clone()));
        crate::jwks_refresh::start(
            &shared.live.load().config,
            None,
            &shared.metrics,
            &shared.shutdown,
        );
        shared.shutdown.cancelled().await;
        let drain_timeout = shared.live.load().config.server.drain_timeout;
        tracing::info!(
            open = shared.stats.open_connections(),
            "draining: no new connections, closing clients with 1001"
        );
        shared.tasks.close();
        if tokio::time::timeout(drain_timeout, shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = shared.stats.open_connections(),
                "drain timeout passed with connections still open"
            );
        }
        // Whatever is still open is dropped with its worker's event loop.
        workers_stop.cancel();
        for finished in workers_done {
            let _ = finished.await;
        }
        admin_stop.cancel();
    }
}

/// One worker thread: an event loop serving the connections its sockets accept, until `stop`.
fn run_worker(listeners: Vec<std::net::TcpListener>, shared: Arc<Shared>, stop: CancellationToken) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start a worker's event loop");
            return;
        }
    };
    runtime.block_on(async move {
        for listener in listeners {
            match TcpListener::from_std(listener) {
                Ok(listener) => {
                    tokio::spawn(accept_loop(listener, shared.clone()));
                }
                Err(error) => tracing::error!(%error, "cannot register a listening socket"),
            }
        }
        stop.cancelled().await;
    });
}

/// Once a minute, keeps what the edge remembers across connections to what it still needs,
/// busy or idle: the per-IP limiter's map to recently seen addresses, the registry's ended
/// sessions to the last ten minutes.
async fn housekeeping(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = every.tick() => {
                if let Some(rate) = &shared.handshake_rate {
                    rate.evict_idle();
                }
                shared.sessions.registry.sweep();
            }
            () = shared.shutdown.cancelled() => return,
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shared.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let Some(pending) = Pending::acquire(&shared, peer) else {
                    drop(tcp);
                    continue;
                };
                shared
                    .tasks
                    .spawn(serve_connection(tcp, peer, shared.clone(), pending));
            }
            Err(error) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A connection's pending-handshake slots, the edge's and its address's, held until it has sent
/// a whole request (or given up).
struct Pending {
    _slot: OwnedSemaphorePermit,
    _address_slot: Option<PendingSlot>,
    /// When the connection was accepted: TLS and the request head share one deadline.
    accepted_at: Instant,
}

impl Pending {
    fn acquire(shared: &Arc<Shared>, peer: SocketAddr) -> Option<Self> {
        let per_address = shared
            .live
            .load()
            .config
            .server
            .max_pending_handshakes_per_ip;
        // The address first: one that holds its share is refused without touching the rest.
        let address_slot = match per_address {
            None => None,
            Some(max) => {
                let Some(slot) = shared
                    .pending_by_address
                    .acquire(address_key(peer.ip()), max)
                else {
                    shared.metrics.limit_hit(Limit::MaxPendingHandshakesPerIp);
                    return None;
                };
                Some(slot)
            }
        };
        let Ok(slot) = shared.handshake_slots.clone().try_acquire_owned() else {
            // Full of clients that have not finished their handshake: close at once rather
            // than queue (the handshake timeout frees slots).
            shared.metrics.limit_hit(Limit::MaxPendingHandshakes);
            return None;
        };
        Some(Self {
            _slot: slot,
            _address_slot: address_slot,
            accepted_at: Instant::now(),
        })
    }
}

async fn serve_connection(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>, pending: Pending) {
    let _ = tcp.set_nodelay(true);
    let live = shared.live.load();
    let handshake_timeout = live.config.server.handshake_timeout;
    let tls = live.config.server.tls.clone();
    drop(live);
    match tls {
        None => {
            let conn = ClientConn { peer, tls: false };
            serve_http(Io::Tcp(tcp), conn, shared, pending).await
        }
        Some(tls) => {
            match tokio::time::timeout(handshake_timeout, TlsAcceptor::from(tls).accept(tcp)).await
            {
                Ok(Ok(stream)) => {
                    let conn = ClientConn { peer, tls: true };
                    serve_http(Io::ServerTls(Box::new(stream)), conn, shared, pending).await
                }
                Ok(Err(error)) => tracing::debug!(client = %peer, %error, "TLS handshake failed"),
                Err(_) => {
                    shared.metrics.limit_hit(Limit::HandshakeTimeout);
                    tracing::debug!(client = %peer, "TLS handshake timed out");
                }
            }
        }
    }
}

/// HTTP/1.1: requests until an upgrade, or until the client is done with a keep-alive
/// connection. The socket is an [`Io`] so that the relay can take it back from hyper by type
/// after the 101 (`Io::from_upgraded`).
async fn serve_http(mut io: Io, conn: ClientConn, shared: Arc<Shared>, pending: Pending) {
    let live = shared.live.load();
    let handshake_timeout = live.config.server.handshake_timeout;
    let max_head = live.config.server.max_header_size;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .max_buf_size(max_head);
    drop(live);
    // TLS and the first request head share one handshake_timeout: a silent client holds its
    // pending slots that long in all. (Each later request of a keep-alive connection has its
    // own.)
    let first_head_due = tokio::time::Instant::from_std(pending.accepted_at + handshake_timeout);
    // The connection's last verified token: a keep-alive client sending it again is not
    // verified again.
    let memo = Arc::new(TokenMemo::default());
    // A client that has sent a whole request is no longer a pending handshake: its slot goes
    // back (an admitted one holds a connection slot instead), so that keep-alive HTTP clients
    // do not crowd out new ones.
    let mut pending = Some(pending);
    // Plain GETs are served by the edge's own reader; the first request that is not one
    // takes the connection to hyper, with what was read of it.
    // The first head is read here: an upgrade goes to hyper at once; a plain GET begins the
    // edge's own reader, boxed (its state, a whole dispatch, would otherwise sit beside
    // hyper's in every connection's future, and be copied with it).
    let mut input = BytesMut::with_capacity(4096);
    let mut deadline = LazyDeadline::new(first_head_due);
    let read = fast_path::read_head(&mut io, &mut input, &mut deadline, &shared, max_head).await;
    let left = match read {
        HeadRead::Closed => return,
        HeadRead::TimedOut => {
            shared.metrics.limit_hit(Limit::HandshakeTimeout);
            tracing::debug!(client = %conn.peer, "no request within the handshake timeout");
            return;
        }
        HeadRead::TooLarge => Left::ToHyper(input.freeze()),
        HeadRead::Whole(head_len) if fast_path::is_upgrade(&input[..head_len]) => {
            Left::ToHyper(input.freeze())
        }
        HeadRead::Whole(head_len) => {
            let reading = Reading {
                input,
                head_len,
                deadline: &mut deadline,
            };
            Box::pin(fast_path::serve(
                &mut io,
                reading,
                conn,
                &shared,
                &memo,
                || drop(pending.take()),
            ))
            .await
        }
    };
    // Hyper keeps time of its own from here.
    drop(deadline);
    let read = match left {
        Left::Closed => return,
        Left::ToHyper(read) => read,
    };
    let head_seen = Arc::new(AtomicBool::new(pending.is_none()));
    let pending = Cell::new(pending);
    let service_shared = shared.clone();
    let seen_in_service = head_seen.clone();
    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        drop(pending.take());
        seen_in_service.store(true, Ordering::Relaxed);
        let request = request.map(ClientBody::Hyper);
        dispatch::handle(request, conn, service_shared.clone(), memo.clone())
    });
    let io = Rewind { prefix: read, io };
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let mut first_head_timer = !head_seen.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    if error.is_timeout() {
                        shared.metrics.limit_hit(Limit::HandshakeTimeout);
                    } else if error.is_parse_too_large() {
                        shared.metrics.limit_hit(Limit::MaxHeaderSize);
                    }
                    tracing::debug!(client = %conn.peer, %error, "HTTP connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(first_head_due), if first_head_timer => {
                if !head_seen.load(Ordering::Relaxed) {
                    shared.metrics.limit_hit(Limit::HandshakeTimeout);
                    tracing::debug!(client = %conn.peer, "no request within the handshake timeout");
                    return;
                }
                first_head_timer = false;
            }
            () = shared.shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
                return;
            }
        }
    }
}
