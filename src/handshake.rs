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
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{Map, Value};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::Shared;
use crate::auth::token_source::{self, SUBPROTOCOL_PREFIX};
use crate::auth::{FoundToken, Identity, TokenSource};
use crate::io::ReadBuffered;
use crate::refusal::Refusal;
use crate::relay;
use crate::route::{ConversationMode, PathMatch, Route, UpstreamTarget};
use crate::upstream::{self, ConnectError, UpstreamConnection, UpstreamRequest};

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
    route: Option<String>,
    identity: Option<Identity>,
}

impl Known {
    fn route(&self) -> &str {
        self.route.as_deref().unwrap_or("-")
    }
}

/// Audit fields describing who connected (never the token, never the raw query).
fn identity_fields(fields: &mut Map<String, Value>, identity: Option<&Identity>) {
    let Some(identity) = identity else { return };
    if !identity.user.is_empty() {
        fields.insert("user".into(), identity.user.clone().into());
    }
    if let Some(tenant) = &identity.tenant {
        fields.insert("tenant".into(), tenant.clone().into());
    }
    if let Some(conversation) = &identity.conversation {
        fields.insert("conversation".into(), conversation.clone().into());
    }
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
            let mut fields = Map::new();
            fields.insert("request_id".into(), request_id.clone().into());
            fields.insert("route".into(), known.route().into());
            fields.insert("client".into(), conn.peer.to_string().into());
            fields.insert("status".into(), status.into());
            fields.insert("reason".into(), refusal.reason.into());
            identity_fields(&mut fields, known.identity.as_ref());
            shared.audit.record("refusal", fields);
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
    let mut named = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(key, _)| key == CONVERSATION_PARAM)
        .map(|(_, value)| value.into_owned());
    let query_conversation = named.next().filter(|c| !c.is_empty());
    if named.next().is_some() {
        return Err(Refusal::bad_handshake("conversation_id may be given once"));
    }
    route.resolve_identity(identity, host.as_deref(), path, query_conversation)?;
    let identity: &Identity = identity;
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
    let ws_config = websocket_config(route);
    let connect_started = Instant::now();
    let (upstream, upstream_url) =
        connect_any(route, &upstream_request, ws_config, request_id).await?;
    let connect_took = connect_started.elapsed();
    shared.metrics.observe_connect(&route.label, connect_took);
    shared.metrics.handshake(&route.label, 101, "ok");

    let response = switching_protocols(
        &client_key,
        &upstream,
        token.as_ref(),
        request_id,
        route.forward_token,
    );
    tracing::info!(
        request_id = %request_id,
        client = %conn.peer,
        route = %route.label,
        upstream = %upstream_url,
        user = %identity.user,
        tenant = identity.tenant.as_deref().unwrap_or(""),
        conversation = identity.conversation.as_deref().unwrap_or(""),
        connect_ms = connect_took.as_secs_f64() * 1000.0,
        "connected"
    );
    let mut fields = Map::new();
    fields.insert("request_id".into(), request_id.into());
    fields.insert("route".into(), route.label.clone().into());
    fields.insert("client".into(), conn.peer.to_string().into());
    fields.insert("upstream".into(), upstream_url.into());
    fields.insert("status".into(), 101.into());
    identity_fields(&mut fields, Some(identity));
    // Kept for the disconnect event only when there is an audit log: every idle connection
    // would otherwise carry them.
    let audit_fields = shared.audit.enabled().then(|| fields.clone());
    shared.audit.record("connect", fields);

    let session = Session {
        request_id: request_id.to_owned(),
        route: route.label.clone(),
        lifecycle: route.lifecycle.clone(),
        // An `exp` centuries away (some issuers mint "never expires" tokens) is no deadline;
        // it must neither overflow the clock arithmetic nor wrap around to "now".
        token_expires_at: identity
            .expires_at
            .filter(|&exp| exp < 32_503_680_000) // year 3000
            .map(|exp| std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp)),
        ws_config,
        audit_fields,
    };
    shared.stats.opened();
    let holds = (
        shared.stats.open_guard(),
        permit,
        user_slot,
        GaugeGuard::new(shared.metrics.open_gauge(&route.label)),
    );
    let on_upgrade = hyper::upgrade::on(request);
    // A combinator rather than an `async` block: an async block awaiting a future it captured
    // keeps two slots for it (measured: 4.0 KiB per connection instead of 1.9 KiB).
    let session = session.run(on_upgrade, upstream, shared.clone());
    shared.tasks.spawn(session.map(move |()| drop(holds)));
    Ok(response)
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

/// One upgraded connection, from the client's upgrade to the last close.
struct Session {
    request_id: String,
    route: String,
    lifecycle: relay::Lifecycle,
    token_expires_at: Option<std::time::SystemTime>,
    ws_config: WebSocketConfig,
    /// The connect event's fields, when an audit log is being written.
    audit_fields: Option<Map<String, Value>>,
}

impl Session {
    async fn run(
        self,
        on_upgrade: hyper::upgrade::OnUpgrade,
        upstream: UpstreamConnection,
        shared: Arc<Shared>,
    ) {
        let started = Instant::now();
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(request_id = %self.request_id, %error, "client vanished during the upgrade");
                let mut upstream = upstream.ws;
                let _ = upstream.close(None).await;
                return;
            }
        };
        // Boxed for the same reason as the relay below: only a pointer stays in this future.
        let client = Box::pin(WebSocketStream::from_raw_socket(
            ReadBuffered::new(TokioIo::new(upgraded)),
            Role::Server,
            Some(self.ws_config),
        ))
        .await;
        let counters = relay::Counters {
            client_to_upstream: shared.metrics.direction(&self.route, "client_to_upstream"),
            upstream_to_client: shared.metrics.direction(&self.route, "upstream_to_client"),
        };
        // Boxed: a future nested inline in another keeps slots for both (measured: 17 KiB
        // per connection inline, 12 KiB boxed).
        let report = Box::pin(relay::relay(
            client,
            upstream.ws,
            self.lifecycle,
            self.token_expires_at,
            counters,
            shared.shutdown.clone(),
        ))
        .await;
        let lasted = started.elapsed();
        let metrics = &shared.metrics;
        metrics.observe_session(&self.route, lasted);
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
        let Some(mut fields) = self.audit_fields else {
            return;
        };
        fields.remove("status");
        fields.insert("reason".into(), report.reason.into());
        fields.insert(
            "ended_by".into(),
            report.ended_by.map(relay::Side::name).into(),
        );
        fields.insert("client_close".into(), report.client_close.into());
        fields.insert("upstream_close".into(), report.upstream_close.into());
        fields.insert("duration_ms".into(), (lasted.as_millis() as u64).into());
        fields.insert(
            "messages_up".into(),
            report.client_to_upstream.messages.into(),
        );
        fields.insert("bytes_up".into(), report.client_to_upstream.bytes.into());
        fields.insert(
            "messages_down".into(),
            report.upstream_to_client.messages.into(),
        );
        fields.insert("bytes_down".into(), report.upstream_to_client.bytes.into());
        shared.audit.record("disconnect", fields);
    }
}

/// tungstenite's buffers sized for chat: the 128 KiB defaults would cost ~134 KiB per socket.
fn websocket_config(route: &Route) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(32 * 1024)
        .max_write_buffer_size(route.max_message_size + 64 * 1024)
        .max_message_size(Some(route.max_message_size))
        .max_frame_size(Some(route.max_message_size))
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
    let is_token_param = |key: &str| {
        token_sources
            .iter()
            .any(|s| matches!(s, TokenSource::Query(name) if name == key))
    };
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (key, value) in form_urlencoded::parse(client_query.unwrap_or("").as_bytes()) {
        // The conversation reaches the upstream only as the edge decided it (upstream_query),
        // never as the client wrote it.
        let edge_decides =
            key == CONVERSATION_PARAM && route.conversation != ConversationMode::None;
        if is_token_param(&key)
            || edge_decides
            || route.upstream_query.iter().any(|(k, _)| *k == key)
        {
            continue;
        }
        query.append_pair(&key, &value);
    }
    for (key, template) in &route.upstream_query {
        if let Some(value) = template.render(identity) {
            query.append_pair(key, &value);
        }
    }
    query.finish()
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
    fn for_target(&self, target: &UpstreamTarget) -> UpstreamRequest {
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
            headers: self.headers.clone(),
            subprotocols: self.subprotocols.clone(),
        }
    }
}

/// Tries the route's targets in round-robin order until one accepts.
async fn connect_any(
    route: &Route,
    request: &ShapedRequest,
    ws_config: WebSocketConfig,
    request_id: &str,
) -> Result<(UpstreamConnection, String), Refusal> {
    let mut last = Refusal::upstream_unreachable();
    for target in route.targets_in_order() {
        let request = request.for_target(target);
        match upstream::connect(target, &request, ws_config, route.connect_timeout).await {
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

fn switching_protocols(
    client_key: &str,
    upstream: &UpstreamConnection,
    token: Option<&FoundToken>,
    request_id: &str,
    forward_token: bool,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        header_value(&derive_accept_key(client_key.as_bytes())),
    );
    headers.insert("x-request-id", header_value(request_id));
    match (&upstream.protocol, token) {
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
        ) if !forward_token => {
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                header_value(&format!("{SUBPROTOCOL_PREFIX}{token}")),
            );
        }
        _ => {}
    }
    response
}
