//! What is reported of every request, built once, here: a refusal's log line, audit line and
//! metrics; a connection's at its start and at its end; a resume's and a refused resume's.
//! Never a token, never a query string.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, Uri};
use http_body_util::Full;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;

use crate::admission::{ClientConn, Held, Rejected};
use crate::audit::Who;
use crate::auth::Identity;
use crate::forward::X_REQUEST_ID;
use crate::relay::RelayReport;
use crate::route::Route;
use crate::state::Shared;
use crate::ws::close::NotResumable;

/// The request's path with any query replaced, for logs (query strings carry tokens).
fn redacted_target(uri: &Uri) -> String {
    match uri.query() {
        Some(_) => format!("{}?<redacted>", uri.path()),
        None => uri.path().to_owned(),
    }
}

/// Who connected, for audit lines.
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
struct RefusalDetails {
    status: u16,
    reason: &'static str,
}

#[derive(Serialize)]
struct ConnectDetails<'a> {
    upstream: &'a str,
    status: u16,
}

#[derive(Serialize)]
struct ResumeRefusedDetails {
    reason: &'static str,
}

#[derive(Serialize)]
struct DisconnectDetails<'a> {
    upstream: &'a str,
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'static str>,
    ended_by: Option<&'static str>,
    client_close: Option<u16>,
    upstream_close: Option<u16>,
    duration_ms: u64,
    messages_up: u64,
    bytes_up: u64,
    messages_down: u64,
    bytes_down: u64,
    /// Chat turns: client messages that began one.
    turns: u64,
}

/// Reports a refused request and builds its response.
pub(crate) fn refused(
    shared: &Shared,
    request_id: &str,
    conn: ClientConn,
    target: &Uri,
    started: Instant,
    rejected: Rejected,
) -> Response<Full<Bytes>> {
    let Rejected {
        refusal,
        route,
        identity,
        http,
        refetch: _,
    } = rejected;
    let route = route.as_deref().unwrap_or("-");
    let status = refusal.status().as_u16();
    if http {
        shared.metrics.http_request(route, status);
    } else {
        shared.metrics.handshake(route, status, refusal.reason());
    }
    if let Some(limit) = refusal.limit() {
        shared.metrics.limit_hit(limit);
    }
    tracing::info!(
        request_id = %request_id,
        client = %conn.peer,
        // A path may carry any byte above 0x7f (U+2028, NEL, bidi controls): recorded as a
        // string, it is quoted and escaped in a text line.
        target = redacted_target(target).as_str(),
        status,
        reason = refusal.reason(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "refused"
    );
    if shared.audit.enabled() {
        let who = who(request_id, route, conn, identity.as_deref(), None);
        let details = RefusalDetails {
            status,
            reason: refusal.reason(),
        };
        shared.audit.record("refusal", request_id, &who, details);
    }
    let mut response = refusal.into_response();
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(X_REQUEST_ID, value);
    }
    response
}

/// A CORS preflight the edge answered.
pub(crate) fn preflight(shared: &Shared, route: &Route, request_id: &str, conn: ClientConn) {
    shared
        .metrics
        .http_request(&route.label, StatusCode::NO_CONTENT.as_u16());
    tracing::info!(request_id = %request_id, client = %conn.peer, route = %route.label, "preflight answered");
}

/// A client coming back to its session.
pub(crate) fn resuming(
    shared: &Shared,
    route: &Route,
    request_id: &str,
    session: &str,
    last_seq: u64,
) {
    shared.metrics.handshake(&route.label, 101, "resumed");
    tracing::info!(request_id = %request_id, route = %route.label, session, last_seq, "resuming");
}

/// A client that cannot have the session it asked for.
pub(crate) fn not_resumable(
    shared: &Shared,
    route: &Route,
    request_id: &str,
    conn: ClientConn,
    identity: &Identity,
    why: NotResumable,
) {
    shared.metrics.handshake(&route.label, 101, "not_resumable");
    shared.metrics.resume(&route.label, why.label());
    tracing::info!(request_id = %request_id, client = %conn.peer, route = %route.label, reason = why.reason(), "session not resumable");
    if shared.audit.enabled() {
        let who = who(request_id, &route.label, conn, Some(identity), None);
        let details = ResumeRefusedDetails {
            reason: why.reason(),
        };
        shared
            .audit
            .record("resume_refused", request_id, &who, details);
    }
}

/// What is reported when a proxied connection (or resumable session) ends, kept from its start.
pub(crate) struct ConnectionReport {
    request_id: Box<str>,
    route: Arc<str>,
    session_duration: Histogram,
    started: Instant,
    /// Who connected, and to which upstream, when an audit log is being written (only then:
    /// every idle connection would otherwise carry it, and every handshake pay for it).
    audit: Option<(Arc<Who>, String)>,
}

/// A connection that has just been upgraded.
pub(crate) struct Connected<'a> {
    pub(crate) request_id: &'a str,
    pub(crate) conn: ClientConn,
    pub(crate) route: &'a Route,
    pub(crate) identity: &'a Identity,
    pub(crate) session_id: Option<&'a str>,
    pub(crate) upstream: &'a str,
    pub(crate) connect_took: Duration,
}

impl ConnectionReport {
    /// Reports the connection's start and keeps what its end will need.
    pub(crate) fn connected(shared: &Shared, connected: Connected<'_>) -> Self {
        let Connected {
            request_id,
            conn,
            route,
            identity,
            session_id,
            upstream,
            connect_took,
        } = connected;
        let metrics = route.metrics(&shared.metrics);
        metrics.connect.observe(connect_took.as_secs_f64());
        metrics.upgraded.inc();
        tracing::info!(
            request_id = %request_id,
            client = %conn.peer,
            route = %route.label,
            upstream = %upstream,
            user = identity.user.as_str(),
            tenant = identity.tenant.as_deref().unwrap_or(""),
            conversation = identity.conversation.as_deref().unwrap_or(""),
            session = session_id.unwrap_or(""),
            connect_ms = connect_took.as_secs_f64() * 1000.0,
            "connected"
        );
        let audit = shared.audit.enabled().then(|| {
            let who = Arc::new(who(
                request_id,
                &route.label,
                conn,
                Some(identity),
                session_id,
            ));
            let details = ConnectDetails {
                upstream,
                status: 101,
            };
            shared.audit.record("connect", request_id, &who, details);
            (who, upstream.to_owned())
        });
        Self {
            request_id: request_id.into(),
            route: route.label.clone(),
            session_duration: metrics.session.clone(),
            started: Instant::now(),
            audit,
        }
    }

    /// Who connected, for a resumable session's own audit lines.
    pub(crate) fn who(&self) -> Option<Arc<Who>> {
        self.audit.as_ref().map(|(who, _)| who.clone())
    }

    /// Reports the end: metrics, the log line, the audit line.
    pub(crate) fn finished(self, report: RelayReport, shared: &Shared) {
        let lasted = self.started.elapsed();
        let metrics = &shared.metrics;
        self.session_duration.observe(lasted.as_secs_f64());
        if let Some(code) = report.client_close {
            metrics.close("client", code);
        }
        if let Some(code) = report.upstream_close {
            metrics.close("upstream", code);
        }
        if let Some(limit) = report.limit {
            metrics.limit_hit(limit);
        }
        tracing::info!(
            request_id = %self.request_id,
            route = %self.route,
            reason = report.reason,
            detail = report.detail,
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
        let details = DisconnectDetails {
            upstream: &upstream,
            reason: report.reason,
            detail: report.detail,
            ended_by: report.ended_by.map(|side| side.name()),
            client_close: report.client_close,
            upstream_close: report.upstream_close,
            duration_ms: lasted.as_millis() as u64,
            messages_up: report.client_to_upstream.messages,
            bytes_up: report.client_to_upstream.bytes,
            messages_down: report.upstream_to_client.messages,
            bytes_down: report.upstream_to_client.bytes,
            turns: report.turns,
        };
        shared
            .audit
            .record("disconnect", &who.request_id, &who, details);
    }
}

#[derive(Serialize)]
struct HttpDetails<'a> {
    method: &'a str,
    path: &'a str,
    status: u16,
    upstream: &'a str,
    complete: bool,
    ended: &'static str,
    duration_ms: u64,
    bytes_up: u64,
    bytes_down: u64,
}

/// How a proxied response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// As the upstream meant it to.
    Complete,
    /// Short of its end: the upstream failed or stalled, or the client went away.
    Cut,
    /// At the token's expiry (an event stream ends cleanly then; another body is cut).
    TokenExpired,
}

impl Ending {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Ending::Complete => "complete",
            Ending::Cut => "cut",
            Ending::TokenExpired => "token_expired",
        }
    }
}

/// A proxied HTTP request whose response is on its way: reported when the response has
/// ended; until then it holds its connection slot.
pub(crate) struct HttpExchange {
    shared: Arc<Shared>,
    route: Arc<str>,
    method: Method,
    status: u16,
    started: Instant,
    seconds: Option<Histogram>,
    /// What the log line and the audit line say, kept only when one of them is written.
    noted: Option<Box<Noted>>,
    _held: Held,
}

struct Noted {
    request_id: Box<str>,
    /// The path only: a query carries tokens.
    path: Box<str>,
    upstream: Box<str>,
    /// Who sent it, when an audit log is being written.
    who: Option<Who>,
}

/// A proxied request that got its response head.
pub(crate) struct Proxied<'a> {
    pub(crate) request_id: &'a str,
    pub(crate) conn: ClientConn,
    pub(crate) route: &'a Route,
    pub(crate) identity: &'a Identity,
    pub(crate) method: Method,
    pub(crate) path: &'a str,
    pub(crate) status: StatusCode,
    pub(crate) upstream: &'a str,
    pub(crate) started: Instant,
    pub(crate) held: Held,
}

impl HttpExchange {
    /// Counts the response by its status and keeps what its end will need.
    pub(crate) fn answered(shared: &Arc<Shared>, proxied: Proxied<'_>) -> Self {
        let Proxied {
            request_id,
            conn,
            route,
            identity,
            method,
            path,
            status,
            upstream,
            started,
            held,
        } = proxied;
        match &route.metrics(&shared.metrics).http_ok {
            Some(ok) if status == StatusCode::OK => {
                ok.inc();
            }
            _ => shared.metrics.http_request(&route.label, status.as_u16()),
        }
        let audited = shared.audit.enabled();
        let noted = (audited || tracing::enabled!(tracing::Level::INFO)).then(|| {
            Box::new(Noted {
                request_id: request_id.into(),
                path: path.into(),
                upstream: upstream.into(),
                who: audited.then(|| who(request_id, &route.label, conn, Some(identity), None)),
            })
        });
        Self {
            shared: shared.clone(),
            route: route.label.clone(),
            method,
            status: status.as_u16(),
            started,
            seconds: route.metrics(&shared.metrics).http_seconds.clone(),
            noted,
            _held: held,
        }
    }

    /// The response has ended as `ending` says, with `bytes_down` sent, after `bytes_up` of
    /// request body.
    pub(crate) fn finished(self, bytes_up: u64, bytes_down: u64, ending: Ending) {
        let complete = ending == Ending::Complete;
        let ended = ending.as_str();
        let lasted = self.started.elapsed();
        if let Some(seconds) = &self.seconds {
            seconds.observe(lasted.as_secs_f64());
        }
        let Some(noted) = &self.noted else { return };
        tracing::info!(
            request_id = %noted.request_id,
            route = %self.route,
            method = %self.method,
            path = &*noted.path,
            status = self.status,
            complete,
            ended,
            bytes_up,
            bytes_down,
            duration_ms = lasted.as_millis() as u64,
            "proxied"
        );
        let Some(who) = &noted.who else { return };
        let details = HttpDetails {
            method: self.method.as_str(),
            path: &noted.path,
            status: self.status,
            upstream: &noted.upstream,
            complete,
            ended,
            duration_ms: lasted.as_millis() as u64,
            bytes_up,
            bytes_down,
        };
        self.shared
            .audit
            .record("http", &noted.request_id, who, details);
    }
}
