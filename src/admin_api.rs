//! The operator's API under `/admin/` on the admin listener: list the open connections, end
//! some of them (4004 to each client, 1000 to its upstream, detached sessions ended), and
//! revoke tokens or users so that their handshakes are refused (401 `token_revoked`) until a
//! moment. Present only when `[admin] token` is set (404 otherwise); every call carries that
//! token as a bearer token (compared in constant time; 401 otherwise) and is written to the
//! audit log with the caller's address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::constant_time;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::audit::Who;
use crate::cluster::events::Told;
use crate::connections::Selector;
use crate::revocation::{RevocationError, Revoked};
use crate::state::Shared;

/// The largest request body read.
const MAX_BODY: usize = 64 * 1024;
/// How long a revocation holds when neither the call nor a live token says (and the least a
/// user's revocation holds: their tokens may be minutes long, a ban is not).
const DEFAULT_REVOCATION: Duration = Duration::from_secs(24 * 3600);
/// The longest a default taken from a token's `exp` holds (an `exp` may be years away).
const LONGEST_DEFAULT: Duration = Duration::from_secs(30 * 24 * 3600);
/// The latest `until` accepted: the year 3000, as for token expiries.
const LATEST_UNTIL: u64 = 32_503_680_000;

/// Whether `path` belongs to the API.
pub(crate) fn is_admin_path(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

/// Selectors as a call names them (the query of a listing, the body of a disconnect).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Selectors {
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conversation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
}

impl Selectors {
    fn selector(&self) -> Selector {
        Selector {
            user: self.user.clone(),
            tenant: self.tenant.clone(),
            conversation: self.conversation.clone(),
            session: self.session.clone(),
            jti: self.jti.clone(),
            without_tenant: false,
        }
    }
}

/// What a revocation names: `{"jti"}` or `{"user", "tenant"?}`, and `"until"` (RFC 3339).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Revocation {
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    until: Option<String>,
}

impl Revocation {
    fn target(&self) -> Result<(Revoked, Selector), &'static str> {
        let revoked = match (&self.jti, &self.user) {
            (Some(jti), None) if self.tenant.is_none() && !jti.is_empty() => {
                Revoked::Jti(jti.clone())
            }
            (None, Some(user)) if !user.is_empty() => Revoked::User {
                tenant: self.tenant.clone().unwrap_or_default(),
                user: user.clone(),
            },
            _ => return Err("name either a jti, or a user (with its tenant, if it has one)"),
        };
        let selector = revoked.selector();
        Ok((revoked, selector))
    }
}

/// An answer: its status and JSON body, and what the audit line says the call asked.
struct Answer {
    status: StatusCode,
    body: serde_json::Value,
    asked: serde_json::Value,
}

impl Answer {
    fn ok(body: serde_json::Value) -> Self {
        Self {
            status: StatusCode::OK,
            body,
            asked: serde_json::Value::Null,
        }
    }

    fn error(status: StatusCode, error: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "error": error, "message": message.into() }),
            asked: serde_json::Value::Null,
        }
    }

    fn asked(mut self, asked: &impl Serialize) -> Self {
        self.asked = serde_json::to_value(asked).unwrap_or_default();
        self
    }
}

/// Answers a call under `/admin/`.
pub(crate) async fn answer(
    request: Request<Incoming>,
    shared: &Arc<Shared>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let token = shared
        .live
        .load()
        .config
        .admin
        .as_ref()
        .and_then(|admin| admin.token.clone());
    let Some(token) = token else {
        // Without a token there is no API: it looks like any path the listener does not have.
        return respond(Answer::error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such path",
        ));
    };
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let answer = if !authorized(&request, &token) {
        Answer::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin API needs its bearer token",
        )
    } else {
        call(request, shared).await
    };
    audit(shared, peer, &method, &path, &answer);
    let mut response = respond(answer);
    if response.status() == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"wsedge-admin\""),
        );
    }
    response
}

fn authorized(request: &Request<Incoming>, token: &[u8]) -> bool {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    constant_time::verify_slices_are_equal(presented, token).is_ok()
}

async fn call(request: Request<Incoming>, shared: &Arc<Shared>) -> Answer {
    let method = request.method().clone();
    match (method, request.uri().path()) {
        (Method::GET, "/admin/connections") => {
            let query = request.uri().query().unwrap_or("");
            match serde_urlencoded_selectors(query) {
                Ok(selectors) => list(shared, &selectors).asked(&selectors),
                Err(message) => Answer::error(StatusCode::BAD_REQUEST, "bad_request", message),
            }
        }
        (Method::POST, "/admin/disconnect") => match body::<Selectors>(request).await {
            Ok(selectors) if selectors.selector().is_empty() => Answer::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "name at least one of user, tenant, conversation, session, jti",
            ),
            Ok(selectors) => {
                let selector = selectors.selector();
                let closed = disconnect(shared, &selector);
                let mut body = json!({ "closed": closed });
                if let Some(cluster) = &shared.cluster {
                    told(&mut body, cluster.disconnect(selector).await);
                }
                Answer::ok(body).asked(&selectors)
            }
            Err(answer) => answer,
        },
        (Method::POST, "/admin/revoke") => match body::<Revocation>(request).await {
            Ok(revocation) => revoke(shared, &revocation).await.asked(&revocation),
            Err(answer) => answer,
        },
        (Method::DELETE, "/admin/revoke") => match body::<Revocation>(request).await {
            Ok(revocation) => lift(shared, &revocation).await.asked(&revocation),
            Err(answer) => answer,
        },
        (_, "/admin/connections" | "/admin/disconnect" | "/admin/revoke") => Answer::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "see the README for the admin API's calls",
        ),
        _ => Answer::error(StatusCode::NOT_FOUND, "not_found", "no such path"),
    }
}

/// The listing's filters from its query (`user`, `tenant`, `conversation`, `session`).
fn serde_urlencoded_selectors(query: &str) -> Result<Selectors, String> {
    let mut selectors = Selectors::default();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let slot = match key.as_ref() {
            "user" => &mut selectors.user,
            "tenant" => &mut selectors.tenant,
            "conversation" => &mut selectors.conversation,
            "session" => &mut selectors.session,
            "jti" => &mut selectors.jti,
            other => return Err(format!("unknown filter {other:?}")),
        };
        *slot = Some(value.into_owned());
    }
    Ok(selectors)
}

/// A JSON body of at most `MAX_BODY` bytes.
async fn body<T: for<'de> Deserialize<'de>>(request: Request<Incoming>) -> Result<T, Answer> {
    let bytes = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            Answer::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body must be JSON of at most {MAX_BODY} bytes"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|error| Answer::error(StatusCode::BAD_REQUEST, "bad_request", error.to_string()))
}

fn list(shared: &Shared, selectors: &Selectors) -> Answer {
    let connections: Vec<_> = shared
        .connections
        .select(&selectors.selector())
        .iter()
        .map(|connection| connection.listed())
        .collect();
    Answer::ok(json!({ "connections": connections }))
}

/// Ends the matching connections; how many.
fn disconnect(shared: &Shared, selector: &Selector) -> usize {
    let matching = shared.connections.select(selector);
    for connection in &matching {
        connection.revoke.turn_on();
    }
    matching.len()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// What the other edges were told, in an answer's body: `"cluster": "published"` (with how
/// many edges listened, this one included), `"pending"` (Redis is down: a revocation is
/// written when it is back, a disconnect reaches only this edge) or `"here_only"` (this edge
/// alone acted).
fn told(body: &mut serde_json::Value, told: Told) {
    match told {
        Told::Published(edges) => {
            body["cluster"] = json!("published");
            body["edges"] = json!(edges);
        }
        Told::Pending => body["cluster"] = json!("pending"),
        Told::HereOnly => body["cluster"] = json!("here_only"),
    }
}

async fn revoke(shared: &Shared, revocation: &Revocation) -> Answer {
    let (revoked, selector) = match revocation.target() {
        Ok(target) => target,
        Err(message) => return Answer::error(StatusCode::BAD_REQUEST, "bad_request", message),
    };
    let until = match &revocation.until {
        Some(until) => match humantime::parse_rfc3339_weak(until) {
            Ok(until) => until
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_secs()),
            Err(_) => {
                return Answer::error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "until must be an RFC 3339 time, like 2026-12-31T23:59:59Z",
                );
            }
        },
        // As long as the tokens it matches live now can be used (at most 30 days), else a
        // day; a user's, at least a day.
        None => {
            let live_until = shared
                .connections
                .select(&selector)
                .iter()
                .filter_map(|connection| connection.token().expires_at)
                .max()
                .filter(|exp| *exp > now())
                .map(|exp| exp.min(now() + LONGEST_DEFAULT.as_secs()));
            let day = now() + DEFAULT_REVOCATION.as_secs();
            match revoked {
                Revoked::Jti(_) => live_until.unwrap_or(day),
                Revoked::User { .. } => live_until.map_or(day, |until| until.max(day)),
            }
        }
    };
    if until <= now() {
        return Answer::error(StatusCode::BAD_REQUEST, "bad_request", "until has passed");
    }
    if until > LATEST_UNTIL {
        return Answer::error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "until is beyond the year 3000",
        );
    }
    let stored = shared.revocations.revoke(revoked.clone(), until);
    if let Err(RevocationError::Full) = stored {
        return stored_error(&RevocationError::Full);
    }
    // In effect whether or not it could be written: its sockets go now.
    let closed = disconnect(shared, &selector);
    let cluster = match &shared.cluster {
        Some(cluster) => Some(cluster.revoke(revoked, until, selector).await),
        None => None,
    };
    let until = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(until));
    let mut answer = match stored {
        Ok(()) => Answer::ok(json!({ "until": until.to_string(), "closed": closed })),
        Err(error) => {
            let mut answer = stored_error(&error);
            answer.body["closed"] = json!(closed);
            answer.body["until"] = json!(until.to_string());
            answer
        }
    };
    if let Some(cluster) = cluster {
        told(&mut answer.body, cluster);
    }
    answer
}

async fn lift(shared: &Shared, revocation: &Revocation) -> Answer {
    let (revoked, _) = match revocation.target() {
        Ok(target) => target,
        Err(message) => return Answer::error(StatusCode::BAD_REQUEST, "bad_request", message),
    };
    let lifted = shared.revocations.lift(&revoked);
    let cluster = match &shared.cluster {
        Some(cluster) => {
            let held_until = lifted.as_ref().ok().copied().flatten();
            Some(cluster.lift(revoked, held_until).await)
        }
        None => None,
    };
    let mut answer = match lifted {
        Ok(lifted) => Answer::ok(json!({ "lifted": lifted.is_some() })),
        Err(error) => stored_error(&error),
    };
    if let Some(cluster) = cluster {
        told(&mut answer.body, cluster);
    }
    answer
}

fn stored_error(error: &RevocationError) -> Answer {
    tracing::error!(%error, "revocation not stored");
    match error {
        RevocationError::Full => Answer::error(
            StatusCode::INSUFFICIENT_STORAGE,
            "too_many_revocations",
            error.to_string(),
        ),
        _ => Answer::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "not_stored",
            "in effect on this edge, but not written to the state directory (see the log): it is lost at a restart",
        ),
    }
}

/// The call's audit line (and log line): who called, what, and the answer.
fn audit(shared: &Shared, peer: SocketAddr, method: &Method, path: &str, answer: &Answer) {
    #[derive(Serialize)]
    struct AdminDetails<'a> {
        method: &'a str,
        path: &'a str,
        status: u16,
        #[serde(skip_serializing_if = "serde_json::Value::is_null")]
        asked: &'a serde_json::Value,
        /// What was done: how many were closed or listed, until when, or the error.
        answered: serde_json::Value,
    }
    tracing::info!(client = %peer, method = %method, path, status = answer.status.as_u16(), "admin call");
    let who = Who {
        request_id: String::new(),
        route: "-".into(),
        client: peer.to_string(),
        user: None,
        tenant: None,
        conversation: None,
        session_id: None,
    };
    let details = AdminDetails {
        method: method.as_str(),
        path,
        status: answer.status.as_u16(),
        asked: &answer.asked,
        answered: match answer.body.get("connections").and_then(|c| c.as_array()) {
            Some(listed) => json!({ "listed": listed.len() }),
            None => answer.body.clone(),
        },
    };
    let request_id = uuid::Uuid::new_v4().to_string();
    shared.audit.record("admin", &request_id, &who, details);
}

fn respond(answer: Answer) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(answer.body.to_string())));
    *response.status_mut() = answer.status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
