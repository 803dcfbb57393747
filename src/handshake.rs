//! The handshake: PRODUCT.md's ordered checks, the request shaped for the upstream, and — only
//! once the upstream has accepted — the 101 to the client and the relay task.
//!
//! Order: per-IP rate (429) → route (404) → WebSocket upgrade (426/400) → origin (403) →
//! capacity (503) → token (401) → identity rules (403) → per-user limit (429) →
//! upstream (502/504/its status) → 101.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::Shared;
use crate::audit::Who;
use crate::auth::token_source::{self, SUBPROTOCOL_PREFIX};
use crate::auth::{FoundToken, Identity, TokenSource};
use crate::query;
use crate::refusal::Refusal;
use crate::relay::{Counters, Relay, RelayParams, RelayReport};
use crate::route::{ConversationMode, PathMatch, Route, UpstreamTarget};
use crate::session::registry::{Attach, Delivery, Reservation, SessionEntry};
use crate::session::resumable::Resumable;
use crate::session::{
    LAST_SEQ_PARAM, ResumeSettings, SESSION_PARAM, SessionKey, close_not_resumable,
    valid_session_id,
};
use crate::upstream::{self, ConnectError, UpstreamConnection, UpstreamRequest};
use crate::ws::close::{EdgeClose, Finish, NotResumable};
use crate::ws::io::Io;
use crate::ws::leg::{CLOSE_TIMEOUT, Leg, close_leg};

/// What the accept loop knows about the client's connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientConn {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Identity headers stripped from every client request, whatever a route injects: a chat core
/// that trusts `x-user-id` must never see a client's own copy.
const IDENTITY_HEADERS: [&str; 3] = ["x-user-id", "x-tenant-id", "x-conversation-id"];

const CONVERSATION_PARAM: &str = "conversation_id";

/// Whether two header names are the same once `_` is read as `-`: CGI, WSGI and several web
/// servers fold them together, so `X_User_Id` must be stripped like `x-user-id`.
fn same_header(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).all(|(x, y)| {
            x.eq_ignore_ascii_case(&y) || (matches!(x, b'_' | b'-') && matches!(y, b'_' | b'-'))
        })
}

/// The request's path with any query replaced, for logs (query strings carry tokens).
pub fn redacted_target(uri: &http::Uri) -> String {
    match uri.query() {
        Some(_) => format!("{}?<redacted>", uri.path()),
        None => uri.path().to_owned(),
    }
}

/// What the handshake has learned so far, for the refusal's log line, metric and audit event.
#[derive(Default)]
struct Known {
    route: Option<Arc<str>>,
    identity: Option<Identity>,
}

impl Known {
    fn route(&self) -> &str {
        self.route.as_deref().unwrap_or("-")
    }
}

/// Who connected, for audit lines (never the token, never the raw query).
fn who(
    request_id: &str,
    route: &str,
    conn: ClientConn,
    identity: Option<&Identity>,
    session_id: Option<&str>,
) -> Who {
    Who {
        request_id: request_id.to_owned(),
        route: route.to_owned(),
        client: conn.peer.to_string(),
        user: identity
            .map(|identity| identity.user.clone())
            .filter(|user| !user.is_empty()),
        tenant: identity.and_then(|identity| identity.tenant.clone()),
        conversation: identity.and_then(|identity| identity.conversation.clone()),
        session_id: session_id.map(str::to_owned),
    }
}

#[derive(Serialize)]
struct Outcome<'a> {
    status: u16,
    reason: &'a str,
}

#[derive(Serialize)]
struct Connected<'a> {
    upstream: &'a str,
    status: u16,
}

#[derive(Serialize)]
struct Refused<'a> {
    reason: &'a str,
}

#[derive(Serialize)]
struct Disconnected<'a> {
    upstream: &'a str,
    reason: &'a str,
    ended_by: Option<&'a str>,
    client_close: Option<u16>,
    upstream_close: Option<u16>,
    duration_ms: u64,
    messages_up: u64,
    bytes_up: u64,
    messages_down: u64,
    bytes_down: u64,
}

pub async fn handle(
    mut request: Request<Incoming>,
    conn: ClientConn,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let request_id = request_id(request.headers());
    let mut known = Known::default();
    match prepare(&mut request, conn, &shared, &request_id, &mut known).await {
        Ok(response) => Ok(response),
        Err(refusal) => {
            let status = refusal.status.as_u16();
            shared
                .metrics
                .handshake(known.route(), status, refusal.reason);
            if let Some(kind) = refusal.limit_kind() {
                shared.metrics.limit_hit(kind);
            }
            tracing::info!(
                request_id = %request_id,
                client = %conn.peer,
                target = %redacted_target(request.uri()),
                status,
                reason = refusal.reason,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "refused"
            );
            if shared.audit.enabled() {
                let who = who(
                    &request_id,
                    known.route(),
                    conn,
                    known.identity.as_ref(),
                    None,
                );
                let outcome = Outcome {
                    status,
                    reason: refusal.reason,
                };
                shared.audit.record("refusal", &request_id, &who, outcome);
            }
            let mut response = refusal.into_response();
            if let Ok(value) = HeaderValue::from_str(&request_id) {
                response.headers_mut().insert("x-request-id", value);
            }
            Ok(response)
        }
    }
}

async fn prepare(
    request: &mut Request<Incoming>,
    conn: ClientConn,
    shared: &Arc<Shared>,
    request_id: &str,
    known: &mut Known,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let config = shared.config.load_full();
    let headers = request.headers();
    let host = request_host(request);
    let path = request.uri().path();
    let query = request.uri().query();

    // First, before any work: a flood from one address must not cost a JWT verification each.
    if let Some(rate) = &shared.handshake_rate
        && !rate.allow(conn.peer.ip())
    {
        return Err(Refusal::handshake_rate());
    }
    let route = config
        .router
        .find(host.as_deref(), path)
        .ok_or_else(Refusal::no_route)?;
    known.route = Some(route.label.clone());
    check_path(path)?;
    let client_key = check_upgrade(request.method(), headers)?;
    if !route.origin_allowed(headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())) {
        return Err(Refusal::origin());
    }
    if shared.shutdown.is_cancelled() {
        return Err(Refusal::draining());
    }
    let permit = shared
        .connection_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| Refusal::full())?;

    let (identity, token) = match &route.auth {
        None => (Identity::default(), None),
        Some(policy) => {
            let (identity, token) = policy
                .authenticate(headers, query)
                .map_err(|error| Refusal::auth(&error))?;
            (identity, Some(token))
        }
    };
    // Kept in `known` (for the refusal's audit event) and borrowed from there: no copy.
    let identity = known.identity.insert(identity);
    let query_conversation = {
        let mut named = query::pairs(query.unwrap_or(""))
            .filter(|pair| pair.key == CONVERSATION_PARAM)
            .map(|pair| pair.value().into_owned());
        let first = named.next().filter(|c| !c.is_empty());
        if named.next().is_some() {
            return Err(Refusal::bad_handshake("conversation_id may be given once"));
        }
        first
    };
    // A conversation the edge made up cannot be asked for again: a resume takes the session's.
    let conversation_named = identity.conversation.is_some() || query_conversation.is_some();
    route.resolve_identity(identity, host.as_deref(), path, query_conversation)?;
    let identity: &Identity = identity;
    // An `exp` centuries away (some issuers mint "never expires" tokens) is no deadline; it
    // must neither overflow the clock arithmetic nor wrap around to "now".
    let token_expires_at = identity
        .expires_at
        .filter(|&exp| exp < 32_503_680_000) // year 3000
        .map(|exp| std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp));

    let session = match &route.resume {
        None => SessionPlan::Plain,
        Some(settings) => {
            plan_session(shared, route, settings, identity, query, conversation_named)?
        }
    };
    let reply = Reply {
        client_key: &client_key,
        token: token.as_ref(),
        request_id,
        forward_token: route.forward_token,
    };
    let session = match session {
        SessionPlan::Resume { entry, last_seq } => {
            return Ok(resume(
                request,
                shared,
                route,
                entry,
                last_seq,
                token_expires_at,
                reply,
            ));
        }
        SessionPlan::Refuse(why) => {
            return Ok(not_resumable(
                request, shared, route, why, identity, conn, reply,
            ));
        }
        SessionPlan::Plain => None,
        SessionPlan::New { entry, announce } => Some((
            Reservation::new(&shared.sessions.registry, &shared.tasks, entry),
            announce,
        )),
    };
    let session_id = session
        .as_ref()
        .and_then(|(reservation, _)| reservation.entry())
        .map(|entry| entry.key.id.clone());

    let user_slot = match config.server.max_connections_per_user {
        Some(max) if !identity.user.is_empty() => Some(
            shared
                .user_connections
                .acquire(
                    identity.tenant.as_deref().unwrap_or(""),
                    &identity.user,
                    max,
                )
                .ok_or_else(Refusal::too_many_connections)?,
        ),
        _ => None,
    };

    let upstream_request = shape_upstream_request(request, route, identity, conn, request_id)?;
    let connect_started = Instant::now();
    let connected = connect_any(route, &upstream_request, request_id).await;
    // On any refusal from here on the reservation is dropped, and with it the session's id.
    let (upstream, upstream_url) = connected?;
    let connect_took = connect_started.elapsed();
    let metrics = route
        .metrics
        .get_or_init(|| shared.metrics.for_route(&route.label));
    metrics.connect.observe(connect_took.as_secs_f64());
    metrics.upgraded.inc();

    let response = switching_protocols(&reply, upstream.protocol.as_ref());
    tracing::info!(
        request_id = %request_id,
        client = %conn.peer,
        route = %route.label,
        upstream = %upstream_url,
        user = %identity.user,
        tenant = identity.tenant.as_deref().unwrap_or(""),
        conversation = identity.conversation.as_deref().unwrap_or(""),
        session = session_id.as_deref().unwrap_or(""),
        connect_ms = connect_took.as_secs_f64() * 1000.0,
        "connected"
    );
    // Built only for an audit log, and then kept for the disconnect event: every idle
    // connection would otherwise carry them, and every handshake pay for them.
    let audit = shared.audit.enabled().then(|| {
        let who = Arc::new(who(
            request_id,
            &route.label,
            conn,
            Some(identity),
            session_id.as_deref(),
        ));
        let connected = Connected {
            upstream: &upstream_url,
            status: 101,
        };
        shared.audit.record("connect", request_id, &who, connected);
        (who, upstream_url.clone())
    });

    let kept = session.and_then(|(reservation, announce)| Some((reservation.keep()?, announce)));
    let resumable = match (kept, &route.resume) {
        (Some((entry, announce)), Some(settings)) => {
            let _ = entry.protocol.set(upstream.protocol.clone());
            Some((
                Box::new(Resumable::new(
                    settings.clone(),
                    entry,
                    shared.sessions.clone(),
                    route.label.clone(),
                    audit.as_ref().map(|(who, _)| who.clone()),
                )),
                announce,
            ))
        }
        _ => None,
    };
    let (resume, announce) = match resumable {
        Some((resume, announce)) => (Some(resume), announce),
        None => (None, None),
    };
    let connection = Connection {
        request_id: request_id.into(),
        route: route.label.clone(),
        session_duration: metrics.session.clone(),
        started: Instant::now(),
        audit,
    };
    let upstream_leg = Leg::upstream(upstream.io, &upstream.leftover, route.max_message_size);
    let params = RelayParams {
        lifecycle: route.lifecycle.clone(),
        max_message: route.max_message_size,
        token_expires_at,
        counters: Counters {
            client_to_upstream: metrics.client_to_upstream.clone(),
            upstream_to_client: metrics.upstream_to_client.clone(),
        },
        shutdown: shared.shutdown.clone(),
        tasks: shared.tasks.clone(),
        resume,
        announce,
    };
    let max_message = route.max_message_size;
    // The relay starts once hyper hands over the client's socket after the 101.
    let relay = hyper::upgrade::on(request)
        .map(move |upgraded| match upgraded {
            Ok(upgraded) => {
                let (io, initial) = Io::from_upgraded(upgraded);
                Some(Leg::client(io, &initial, max_message))
            }
            Err(error) => {
                tracing::debug!(%error, "client vanished during the upgrade");
                None
            }
        })
        .then(move |client| Relay::new(client, upstream_leg, params));
    shared.stats.opened();
    let holds = (
        shared.stats.open_guard(),
        permit,
        user_slot,
        GaugeGuard::new(metrics.open.clone()),
    );
    let shared_after = shared.clone();
    // A combinator rather than an `async` block: an async block awaiting a future it holds
    // keeps room for it twice, and every open connection pays for that.
    shared.tasks.spawn(relay.map(move |report| {
        connection.finish(report, &shared_after);
        drop(holds);
    }));
    Ok(response)
}

/// What the route's resume rules make of a handshake.
enum SessionPlan {
    /// Not a resumable session (no resume on the route, or no `session_id`).
    Plain,
    /// A new session under this id.
    New {
        entry: Arc<SessionEntry>,
        announce: Option<String>,
    },
    /// A client coming back to a live session.
    Resume {
        entry: Arc<SessionEntry>,
        last_seq: u64,
    },
    /// A session that cannot be resumed (or started): the client is told so after the upgrade.
    Refuse(NotResumable),
}

/// `session_id` and `last_seq` from the query, each at most once.
fn session_params(query: Option<&str>) -> Result<(Option<String>, Option<u64>), Refusal> {
    let mut id = None;
    let mut last_seq = None;
    for pair in query::pairs(query.unwrap_or("")) {
        let (key, value) = (pair.key.as_ref(), pair.value());
        if key == SESSION_PARAM {
            if id.is_some() {
                return Err(Refusal::bad_handshake("session_id may be given once"));
            }
            if !valid_session_id(&value) {
                return Err(Refusal::bad_handshake(
                    "session_id must be 1 to 128 characters of A-Z a-z 0-9 - _ . ~",
                ));
            }
            id = Some(value.into_owned());
        } else if key == LAST_SEQ_PARAM {
            if last_seq.is_some() {
                return Err(Refusal::bad_handshake("last_seq may be given once"));
            }
            last_seq = Some(value.parse::<u64>().map_err(|_| {
                Refusal::bad_handshake("last_seq must be a count of messages received")
            })?);
        }
    }
    if last_seq.is_some() && id.is_none() {
        return Err(Refusal::bad_handshake("last_seq needs a session_id"));
    }
    Ok((id, last_seq))
}

fn plan_session(
    shared: &Shared,
    route: &Route,
    settings: &ResumeSettings,
    identity: &Identity,
    query: Option<&str>,
    conversation_named: bool,
) -> Result<SessionPlan, Refusal> {
    let (id, last_seq) = session_params(query)?;
    let id = match id {
        Some(id) => id,
        // The announcement tells the client the id the edge chose for it.
        None if settings.announce => uuid::Uuid::new_v4().to_string(),
        None => return Ok(SessionPlan::Plain),
    };
    let key = SessionKey {
        route: route.label.to_string(),
        tenant: identity.tenant.clone().unwrap_or_default(),
        user: identity.user.clone(),
        id,
    };
    let mut failed = None;
    if let Some(last_seq) = last_seq {
        let found = shared.sessions.registry.find(&key).and_then(|entry| {
            if conversation_named && entry.conversation != identity.conversation {
                return Err(NotResumable::Conversation);
            }
            entry.check(last_seq)?;
            Ok(entry)
        });
        match found {
            Ok(entry) => return Ok(SessionPlan::Resume { entry, last_seq }),
            // Told, then started afresh: never silently.
            Err(why) if settings.announce => failed = Some(why),
            Err(why) => return Ok(SessionPlan::Refuse(why)),
        }
    }
    let id = key.id.clone();
    match shared
        .sessions
        .registry
        .begin(key, identity.conversation.clone())
    {
        // A live session that could not be resumed cannot be replaced either: the client
        // hears why it could not be resumed.
        Err(NotResumable::InUse) if failed.is_some() => {
            Ok(SessionPlan::Refuse(failed.unwrap_or(NotResumable::InUse)))
        }
        Err(why) => Ok(SessionPlan::Refuse(why)),
        Ok(entry) => {
            if let Some(why) = failed {
                shared.metrics.resume(&route.label, why.label());
            }
            Ok(SessionPlan::New {
                entry,
                announce: settings.announce.then(|| {
                    let mut announce = serde_json::json!({
                        "type": "edge.session",
                        "session_id": id,
                        "resumed": false,
                    });
                    if let Some(why) = failed {
                        announce["reason"] = why.reason().into();
                    }
                    announce.to_string()
                }),
            })
        }
    }
}

/// What every 101 of a handshake is built from.
struct Reply<'a> {
    client_key: &'a str,
    token: Option<&'a FoundToken>,
    request_id: &'a str,
    forward_token: bool,
}

/// A client coming back: a 101 at once (the session's upstream is already there), then its
/// socket is handed to the session, which replays what it missed.
fn resume(
    request: &mut Request<Incoming>,
    shared: &Arc<Shared>,
    route: &Route,
    entry: Arc<SessionEntry>,
    last_seq: u64,
    token_expires_at: Option<std::time::SystemTime>,
    reply: Reply<'_>,
) -> Response<Full<Bytes>> {
    // The subprotocol the upstream chose for the session, if this client offers it again.
    let protocol = entry.protocol.get().cloned().flatten().filter(|chosen| {
        token_source::offered_subprotocols(request.headers())
            .any(|offered| chosen.as_bytes() == offered.as_bytes())
    });
    let response = switching_protocols(&reply, protocol.as_ref());
    shared.metrics.handshake(&route.label, 101, "resumed");
    tracing::info!(request_id = %reply.request_id, route = %route.label, session = %entry.key.id, last_seq, "resuming");
    let on_upgrade = hyper::upgrade::on(request);
    let max_message = route.max_message_size;
    let request_id = reply.request_id.to_owned();
    let shared_in_task = shared.clone();
    let route_label = route.label.clone();
    shared.tasks.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (io, initial) = Io::from_upgraded(upgraded);
        let attach = Attach {
            leg: Leg::client(io, &initial, max_message),
            last_seq,
            token_expires_at,
            request_id,
        };
        match entry.deliver(Box::new(attach)) {
            Delivery::Delivered => {}
            // Two reconnects raced: this one takes the session, the earlier one is told.
            Delivery::Replaced(earlier) => {
                let taken_over = Finish::Send(EdgeClose::TakenOver);
                close_leg(earlier.leg, taken_over, CLOSE_TIMEOUT, true).await;
            }
            // The session ended between the check and now; the registry knows how.
            Delivery::Ended(returned) => {
                let why = shared_in_task
                    .sessions
                    .registry
                    .find(&entry.key)
                    .err()
                    .unwrap_or(NotResumable::Expired);
                shared_in_task.metrics.resume(&route_label, why.label());
                close_not_resumable(returned.leg, why).await;
            }
        }
    });
    response
}

/// A session that cannot be resumed: upgraded, then closed with 4002 and the reason. A close
/// code is what a browser can read; an HTTP refusal would reach its script as a bare 1006.
fn not_resumable(
    request: &mut Request<Incoming>,
    shared: &Arc<Shared>,
    route: &Route,
    why: NotResumable,
    identity: &Identity,
    conn: ClientConn,
    reply: Reply<'_>,
) -> Response<Full<Bytes>> {
    // Browsers fail a socket whose offered subprotocols all go unanswered before reading any
    // close code: answer with the first one offered (the socket is closed at once anyway).
    let first_offered = token_source::offered_subprotocols(request.headers())
        .find(|entry| !entry.starts_with(SUBPROTOCOL_PREFIX))
        .and_then(|entry| HeaderValue::from_str(entry).ok());
    let response = switching_protocols(&reply, first_offered.as_ref());
    shared.metrics.handshake(&route.label, 101, "not_resumable");
    shared.metrics.resume(&route.label, why.label());
    tracing::info!(request_id = %reply.request_id, client = %conn.peer, route = %route.label, reason = why.reason(), "session not resumable");
    if shared.audit.enabled() {
        let who = who(reply.request_id, &route.label, conn, Some(identity), None);
        let refused = Refused {
            reason: why.reason(),
        };
        shared
            .audit
            .record("resume_refused", reply.request_id, &who, refused);
    }
    let on_upgrade = hyper::upgrade::on(request);
    let max_message = route.max_message_size;
    shared.tasks.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (io, initial) = Io::from_upgraded(upgraded);
        close_not_resumable(Leg::client(io, &initial, max_message), why).await;
    });
    response
}

/// Counts a connection in a gauge for as long as the guard lives.
struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What is reported when a proxied connection (or resumable session) ends.
struct Connection {
    request_id: Box<str>,
    route: Arc<str>,
    session_duration: prometheus_client::metrics::histogram::Histogram,
    started: Instant,
    /// Who connected, and to which upstream, when an audit log is being written.
    audit: Option<(Arc<Who>, String)>,
}

impl Connection {
    fn finish(self, report: RelayReport, shared: &Shared) {
        let lasted = self.started.elapsed();
        let metrics = &shared.metrics;
        self.session_duration.observe(lasted.as_secs_f64());
        if let Some(code) = report.client_close {
            metrics.close("client", code);
        }
        if let Some(code) = report.upstream_close {
            metrics.close("upstream", code);
        }
        if let Some(kind) = report.limit {
            metrics.limit_hit(kind);
        }
        tracing::info!(
            request_id = %self.request_id,
            route = %self.route,
            reason = report.reason,
            client_close = report.client_close,
            upstream_close = report.upstream_close,
            messages_up = report.client_to_upstream.messages,
            bytes_up = report.client_to_upstream.bytes,
            messages_down = report.upstream_to_client.messages,
            bytes_down = report.upstream_to_client.bytes,
            duration_ms = lasted.as_millis() as u64,
            "disconnected"
        );
        let Some((who, upstream)) = self.audit else {
            return;
        };
        let disconnected = Disconnected {
            upstream: &upstream,
            reason: report.reason,
            ended_by: report.ended_by.map(|side| side.name()),
            client_close: report.client_close,
            upstream_close: report.upstream_close,
            duration_ms: lasted.as_millis() as u64,
            messages_up: report.client_to_upstream.messages,
            bytes_up: report.client_to_upstream.bytes,
            messages_down: report.upstream_to_client.messages,
            bytes_down: report.upstream_to_client.bytes,
        };
        shared
            .audit
            .record("disconnect", &who.request_id, &who, disconnected);
    }
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

fn request_host(request: &Request<Incoming>) -> Option<String> {
    let raw = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request.uri().host())?;
    let host = match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => raw.rsplit_once(':').map_or(raw, |(host, _port)| host),
    };
    Some(host.to_ascii_lowercase())
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    token_source::header_list(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// Refuses `.` and `..` path segments (also percent-encoded): an upstream or intermediary that
/// normalises them would route a request outside the path its route names.
fn check_path(path: &str) -> Result<(), Refusal> {
    let dot_segment = path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    });
    if dot_segment {
        return Err(Refusal::bad_handshake(
            "dot segments are not allowed in the path",
        ));
    }
    Ok(())
}

/// Checks that this is a WebSocket upgrade (RFC 6455 §4.2.1) and returns the client's key.
fn check_upgrade(method: &Method, headers: &HeaderMap) -> Result<String, Refusal> {
    let is_upgrade = has_token(headers, header::CONNECTION, "upgrade")
        && has_token(headers, header::UPGRADE, "websocket");
    if !is_upgrade {
        return Err(Refusal::not_websocket());
    }
    if method != Method::GET {
        return Err(Refusal::bad_handshake("a WebSocket upgrade must be a GET"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(Refusal::not_websocket());
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|key| key.len() == 24)
        .ok_or_else(|| Refusal::bad_handshake("missing or malformed Sec-WebSocket-Key"))?;
    Ok(key.to_owned())
}

/// Builds what goes upstream: the client's headers minus handshake, hop-by-hop, identity and
/// token-carrying ones; the injected identity; forwarding headers; the rewritten query.
fn shape_upstream_request(
    request: &Request<Incoming>,
    route: &Route,
    identity: &Identity,
    conn: ClientConn,
    request_id: &str,
) -> Result<ShapedRequest, Refusal> {
    let headers = request.headers();
    let strip_token = !route.forward_token;
    // Every place the policy reads tokens from is cleared, not only the one that held the
    // token used: a second copy elsewhere must not reach the upstream either.
    let sources: &[TokenSource] = match (&route.auth, strip_token) {
        (Some(policy), true) => &policy.token_from,
        _ => &[],
    };
    let strip_authorization = sources.contains(&TokenSource::Header);
    let token_cookies: Vec<&str> = sources
        .iter()
        .filter_map(|s| match s {
            TokenSource::Cookie(name) => Some(name.as_str()),
            _ => None,
        })
        .collect();

    // Headers the client's Connection header nominates are hop-by-hop too (RFC 9110 §7.6.1).
    let nominated: Vec<String> = token_source::header_list(headers, header::CONNECTION)
        .map(str::to_ascii_lowercase)
        .collect();
    let injected: Vec<&HeaderName> = route.inject.iter().map(|(name, _)| name).collect();

    let mut out: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(headers.len() + 6);
    for (name, value) in headers {
        let lower = name.as_str();
        let dropped = crate::route::is_reserved_header(name)
            || IDENTITY_HEADERS
                .iter()
                .any(|identity| same_header(identity, lower))
            || injected
                .iter()
                .any(|injected| same_header(injected.as_str(), lower))
            || nominated.iter().any(|n| n == lower)
            || matches!(
                lower,
                "keep-alive"
                    | "proxy-connection"
                    | "proxy-authorization"
                    | "x-request-id"
                    | "x-real-ip"
                    | "forwarded"
            )
            || lower.starts_with("x-forwarded-")
            || (strip_authorization && name == header::AUTHORIZATION)
            || (!token_cookies.is_empty() && name == header::COOKIE);
        if !dropped {
            out.push((name.clone(), value.clone()));
        }
    }
    if !token_cookies.is_empty()
        && let Some(rest) = token_source::cookie_header_without(headers, &token_cookies)
        && let Ok(value) = HeaderValue::from_str(&rest)
    {
        out.push((header::COOKIE, value));
    }

    for (name, template) in &route.inject {
        if let Some(value) = template.render(identity) {
            let value = HeaderValue::from_str(&value).map_err(|_| {
                Refusal::auth(&crate::auth::AuthError::Invalid(
                    "a claim cannot be carried in a header",
                ))
            })?;
            out.push((name.clone(), value));
        }
    }
    let client_ip = conn.peer.ip().to_string();
    out.push((
        HeaderName::from_static("x-forwarded-for"),
        header_value(&client_ip),
    ));
    out.push((
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    ));
    out.push((
        HeaderName::from_static("x-request-id"),
        header_value(request_id),
    ));

    let offered: Vec<&str> = token_source::offered_subprotocols(headers)
        .filter(|entry| {
            !(sources.contains(&TokenSource::Subprotocol) && entry.starts_with(SUBPROTOCOL_PREFIX))
        })
        .collect();
    let subprotocols = (!offered.is_empty()).then(|| offered.join(", "));

    Ok(ShapedRequest {
        remainder: match &route.path {
            PathMatch::Prefix(prefix) => request.uri().path()[prefix.len()..].to_owned(),
            PathMatch::Exact(_) => String::new(),
        },
        query: upstream_query(request.uri().query(), route, identity, sources),
        headers: out,
        subprotocols,
    })
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The client query as it goes upstream: minus the token (unless forwarded) and minus keys the
/// route sets itself, plus the route's `upstream_query`.
fn upstream_query(
    client_query: Option<&str>,
    route: &Route,
    identity: &Identity,
    token_sources: &[TokenSource],
) -> String {
    // The token, and what the edge decides: the conversation reaches the upstream only as the
    // edge decided it (upstream_query), never as the client wrote it. Dropped in any spelling
    // an upstream's parser may read as the same key (`may_read_as`), and behind a `;` (some
    // split pairs on it too).
    let edge_owns = |key: &str| {
        let token = token_sources
            .iter()
            .any(|s| matches!(s, TokenSource::Query(name) if may_read_as(key, name)));
        let conversation =
            may_read_as(key, CONVERSATION_PARAM) && route.conversation != ConversationMode::None;
        token
            || conversation
            || route
                .upstream_query
                .iter()
                .any(|(name, _)| may_read_as(key, name))
    };
    // Pairs the upstream gets as the client wrote them; only the route's own are encoded here.
    let mut query = String::new();
    for pair in query::pairs(client_query.unwrap_or("")) {
        let hidden_owned = pair.raw.contains(';')
            && pair
                .raw
                .split(';')
                .any(|part| query::pairs(part).any(|inner| edge_owns(&inner.key)));
        if edge_owns(&pair.key) || hidden_owned {
            continue;
        }
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str(pair.raw);
    }
    let mut serializer = form_urlencoded::Serializer::for_suffix(query, 0);
    for (key, template) in &route.upstream_query {
        if let Some(value) = template.render(identity) {
            serializer.append_pair(key, &value);
        }
    }
    serializer.finish()
}

/// Whether some upstream's query parser may read `key` as `name`: frameworks compare keys
/// ignoring case, Unicode's too (.NET, Java: `conversatıon_id` with a dotless ı), merge
/// `name[]` and `name[x]` into `name` (Rack, PHP, Express's `qs`), and PHP reads `.` and
/// spaces in a key as `_`.
fn may_read_as(key: &str, name: &str) -> bool {
    fn fold(text: &str) -> impl Iterator<Item = char> + '_ {
        let base = text.split('[').next().unwrap_or(text);
        base.chars()
            .flat_map(char::to_uppercase)
            .flat_map(char::to_lowercase)
            .map(|c| if c == '.' || c == ' ' { '_' } else { c })
    }
    fold(key).eq(fold(name))
}

/// The upstream request before a target is chosen: each target has its own path and query.
struct ShapedRequest {
    /// What follows a prefix route's path in the client's path.
    remainder: String,
    query: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    subprotocols: Option<String>,
}

impl ShapedRequest {
    fn for_target(&self, target: &UpstreamTarget) -> UpstreamRequest<'_> {
        let mut path = target.path.clone();
        let remainder = self.remainder.as_str();
        match (path.ends_with('/'), remainder.strip_prefix('/')) {
            (_, None) if remainder.is_empty() => {}
            (true, Some(rest)) => path.push_str(rest),
            (false, None) => {
                path.push('/');
                path.push_str(remainder);
            }
            _ => path.push_str(remainder),
        }
        if path.is_empty() {
            path.push('/');
        }
        let mut path_and_query = path;
        let target_query = target.query.as_deref().filter(|q| !q.is_empty());
        for (i, part) in target_query
            .into_iter()
            .chain((!self.query.is_empty()).then_some(self.query.as_str()))
            .enumerate()
        {
            path_and_query.push(if i == 0 { '?' } else { '&' });
            path_and_query.push_str(part);
        }
        UpstreamRequest {
            path_and_query,
            headers: &self.headers,
            subprotocols: self.subprotocols.as_deref(),
        }
    }
}

/// Tries the route's targets in round-robin order until one accepts.
async fn connect_any(
    route: &Route,
    request: &ShapedRequest,
    request_id: &str,
) -> Result<(UpstreamConnection, String), Refusal> {
    let mut last = Refusal::upstream_unreachable();
    for target in route.targets_in_order() {
        let request = request.for_target(target);
        match upstream::connect(target, &request, route.connect_timeout).await {
            Ok(connection) => {
                target.mark_up();
                return Ok((connection, target.url.clone()));
            }
            Err(error) => {
                tracing::warn!(request_id = %request_id, upstream = %target.url, %error, "upstream connect failed");
                if !matches!(error, ConnectError::Refused(_)) {
                    target.mark_down(route.upstream_cooldown);
                }
                last = match error {
                    ConnectError::Unreachable(_) => Refusal::upstream_unreachable(),
                    ConnectError::Timeout => Refusal::upstream_timeout(),
                    ConnectError::BadResponse(_) => Refusal::upstream_bad_response(),
                    // A deliberate refusal is the upstream's answer, not a failure to try elsewhere.
                    ConnectError::Refused(status) => return Err(Refusal::upstream_refused(status)),
                };
            }
        }
    }
    Err(last)
}

fn switching_protocols(reply: &Reply<'_>, chosen: Option<&HeaderValue>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        header_value(&derive_accept_key(reply.client_key.as_bytes())),
    );
    headers.insert("x-request-id", header_value(reply.request_id));
    match (chosen, reply.token) {
        (Some(chosen), _) => {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, chosen.clone());
        }
        // Browsers fail a socket whose offered subprotocols all go unanswered. When the only
        // thing to answer with is the token entry the browser itself sent, echo it back.
        (
            None,
            Some(FoundToken {
                token,
                source: TokenSource::Subprotocol,
            }),
        ) if !reply.forward_token => {
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                header_value(&format!("{SUBPROTOCOL_PREFIX}{token}")),
            );
        }
        _ => {}
    }
    response
}
