//! Admission: the ordered checks every request passes before anything is sent upstream, ending
//! in [`Admitted`] — the route, who the client is, the limits it holds, and for a WebSocket
//! upgrade what becomes of its session — or a [`Refusal`].
//!
//! Order: per-IP rate (429) → a well-formed request (400) → route (404) → path (400) →
//! WebSocket upgrade, or plain HTTP on a route that proxies it (426/400) → origin (403) → a CORS
//! preflight is answered here → draining (503) → capacity (503) → token (401) → identity rules
//! (403/400) → session plan (400) → per-user limit (429, upgrades only). The upstream
//! (502/504/its status) comes after, in the handshake or the HTTP pass-through.

pub(crate) mod identity;
pub(crate) mod path;
pub(crate) mod refusal;
mod session_plan;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request};
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::claims::claim_string;
use crate::auth::error::AuthError;
use crate::auth::jwks::JwksKeys;
use crate::auth::memo::TokenMemo;
use crate::auth::token_source::{self, FoundToken};
use crate::auth::{Identity, Presented, Verifier};
use crate::cluster::leases::Lease;
use crate::config::settings::Affinity;
use crate::cors;
use crate::forward::X_REQUEST_ID;
use crate::limits::UserSlot;
use crate::route::Route;
use crate::session::registry::{Reservation, SessionEntry, SessionKey};
use crate::state::{Live, Shared};
use crate::upstream::targets::user_key;
use crate::ws::close::NotResumable;
use refusal::Refusal;
use session_plan::Planned;

/// What the accept loop knows about the client's connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientConn {
    pub(crate) peer: SocketAddr,
    pub(crate) tls: bool,
}

/// A request that passed every check.
pub(crate) struct Admitted<'a> {
    pub(crate) route: &'a Route,
    pub(crate) identity: Identity,
    /// The token and where it was found (`None` on an `auth = "none"` route).
    pub(crate) token: Option<FoundToken>,
    /// When the token expires; `None` for no token, or an `exp` too far out to be a deadline.
    pub(crate) token_expires_at: Option<SystemTime>,
    /// The target the route's affinity places this client on, if it has one.
    pub(crate) affinity: Option<u64>,
    pub(crate) kind: Kind<'a>,
}

/// A WebSocket upgrade, or a plain HTTP request on a route that proxies them.
pub(crate) enum Kind<'a> {
    WebSocket {
        /// The client's `Sec-WebSocket-Key`.
        websocket_key: String,
        session: SessionPlan<'a>,
    },
    /// The connection slot it holds until its response has ended.
    Http { held: Held },
    /// A CORS preflight from an allowed origin, answered by the edge without a token (a
    /// browser sends none with it): the identity is empty.
    Preflight,
}

/// What becomes of an admitted connection.
pub(crate) enum SessionPlan<'a> {
    /// An upstream connection of its own, holding its slots; resumable when `session` is set.
    Connect {
        held: Held,
        session: Option<NewSession<'a>>,
    },
    /// A client coming back to a live session (which holds the slots already).
    Resume {
        entry: Arc<SessionEntry>,
        last_seq: u64,
    },
    /// A session this edge does not know, which another edge may hold: asked of the cluster.
    Elsewhere {
        key: SessionKey,
        last_seq: u64,
        conversation: Option<String>,
        /// The connection slot the client holds here while it is carried to that edge.
        connection: OwnedSemaphorePermit,
    },
    /// A session that cannot be resumed (or started): the client is told so after the upgrade.
    Refuse(NotResumable),
}

/// A new resumable session: its id reserved in the registry until the session starts.
pub(crate) struct NewSession<'a> {
    pub(crate) reservation: Reservation<'a>,
    /// The `edge.session` announcement, when the route sends one.
    pub(crate) announce: Option<String>,
}

/// The limits a connection holds until it ends.
pub(crate) struct Held {
    pub(crate) _connection: OwnedSemaphorePermit,
    pub(crate) _user: Option<UserSlot>,
    /// The user's place in the count across the cluster's edges.
    pub(crate) lease: Option<Lease>,
}

/// A refused request, and what was learned of it before (for the refusal's report).
pub(crate) struct Rejected {
    pub(crate) refusal: Refusal,
    pub(crate) route: Option<Arc<str>>,
    pub(crate) identity: Option<Box<Identity>>,
    /// A plain HTTP request on a route that proxies them (counted as such, not as a handshake).
    pub(crate) http: bool,
    /// For a token whose `kid` the policy's key set lacks: that set, which may be fetched again
    /// before the request is judged once more.
    pub(crate) refetch: Option<Refetch>,
}

/// A key set that lacked a token's `kid`, and which generation of it did.
pub(crate) struct Refetch {
    pub(crate) keys: Arc<JwksKeys>,
    pub(crate) seen: u64,
}

/// The request's id: the client's `x-request-id` when it is a sane one, else a fresh UUID. Sane
/// is what ids are made of (UUIDs, ULIDs, base64, trace ids): no quote, backslash or space
/// that could end a field of a log line early.
pub(crate) fn request_id(headers: &HeaderMap) -> String {
    let sane = |b: u8| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b);
    headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(sane))
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
            uuid::Uuid::new_v4()
                .hyphenated()
                .encode_lower(&mut text)
                .to_owned()
        })
}

/// What the checks have learned so far, for the report of a refusal.
#[derive(Default)]
struct Known<'a> {
    route: Option<&'a Route>,
    identity: Option<Identity>,
    http: bool,
    refetch: Option<Refetch>,
}

/// Whether a request is checked for the first time, or again after its policy's key set was
/// fetched for it (it was counted against the per-address rate the first time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    First,
    Again,
    /// Once more after the cluster said no other edge holds the session asked for.
    NotElsewhere,
}

/// Runs the checks in order.
pub(crate) fn admit<'a, B>(
    request: &Request<B>,
    conn: ClientConn,
    shared: &'a Shared,
    live: &'a Live,
    memo: &TokenMemo,
    pass: Pass,
) -> Result<Admitted<'a>, Rejected> {
    let mut known = Known::default();
    checks(request, conn, shared, live, memo, pass, &mut known).map_err(|refusal| Rejected {
        refusal,
        route: known.route.map(|route| route.label.clone()),
        identity: known.identity.map(Box::new),
        http: known.http,
        refetch: known.refetch,
    })
}

fn checks<'a, B>(
    request: &Request<B>,
    conn: ClientConn,
    shared: &'a Shared,
    live: &'a Live,
    memo: &TokenMemo,
    pass: Pass,
    known: &mut Known<'a>,
) -> Result<Admitted<'a>, Refusal> {
    let headers = request.headers();
    let path = request.uri().path();
    let query = request.uri().query();

    // First, before any work: a flood from one address must not cost a JWT verification each.
    // A plain HTTP request is counted only when its token needs verifying (below): a
    // keep-alive client sends the same token with every request, and verifies it once.
    let rate_allows = || {
        pass != Pass::First
            || shared
                .handshake_rate
                .as_ref()
                .is_none_or(|rate| rate.allow(conn.peer.ip()))
    };
    let asks_upgrade = has_token(headers, header::CONNECTION, "upgrade")
        && has_token(headers, header::UPGRADE, "websocket");
    if asks_upgrade && !rate_allows() {
        return Err(Refusal::RateLimited);
    }
    let host = request_host(request)?;
    let route = live
        .router
        .find(host.as_deref(), path)
        .ok_or(Refusal::NoRoute)?;
    known.route = Some(route);
    path::check(path)?;
    let websocket_key =
        match websocket_key(asks_upgrade, request.method(), request.version(), headers)? {
            Some(key) => Some(key),
            None if route.http.is_some() => None,
            None => return Err(Refusal::UpgradeRequired),
        };
    known.http = websocket_key.is_none();
    if !route.origin_allowed(headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())) {
        return Err(Refusal::OriginNotAllowed);
    }
    if websocket_key.is_none() && route.allowed_origins.is_some() && cors::is_preflight(request) {
        return Ok(Admitted {
            route,
            identity: Identity::default(),
            token: None,
            token_expires_at: None,
            affinity: None,
            kind: Kind::Preflight,
        });
    }
    if shared.shutdown.is_cancelled() {
        return Err(Refusal::Draining);
    }
    let connection = shared
        .connection_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| Refusal::Capacity)?;

    let (identity, token) = match &route.auth {
        None => (Identity::default(), None),
        Some(policy) => {
            let memo = websocket_key.is_none().then_some(memo);
            let (identity, token) = match policy.present(headers, query, memo)? {
                Presented::Remembered(identity, token) => (identity, token),
                Presented::Fresh(_) if !asks_upgrade && !rate_allows() => {
                    return Err(Refusal::RateLimited);
                }
                Presented::Fresh(found) => {
                    // Read before verifying: a set installed meanwhile is a reason to look again.
                    let seen = match &policy.verifier {
                        Verifier::Jwks(keys) => keys.generation(),
                        _ => 0,
                    };
                    match policy.verify(found, memo) {
                        Ok(verified) => verified,
                        Err(AuthError::UnknownKey) => {
                            if let Verifier::Jwks(keys) = &policy.verifier {
                                known.refetch = Some(Refetch {
                                    keys: keys.clone(),
                                    seen,
                                });
                            }
                            return Err(Refusal::TokenKeyUnknown);
                        }
                        Err(error) => return Err(error.into()),
                    }
                }
            };
            (identity, Some(token))
        }
    };
    // Kept for the refusal's report and borrowed from there: no copy.
    let identity = known.identity.insert(identity);
    let query_conversation = identity::query_conversation(query)?;
    // A conversation the edge made up cannot be asked for again: a resume takes the session's.
    let conversation_named = identity.conversation.is_some() || query_conversation.is_some();
    identity::resolve(route, identity, host.as_deref(), path, query_conversation)?;
    // An operator's revocation: the token by its `jti`, or its user in the tenant the route
    // settled on (looked up only while any revocation holds).
    if route.auth.is_some() && revoked(shared, identity) {
        return Err(Refusal::TokenRevoked);
    }
    // With Redis down and on_redis_down = "closed", neither revocations nor limits can be
    // vouched for across the edges.
    if route.auth.is_some()
        && shared
            .cluster
            .as_ref()
            .is_some_and(|cluster| cluster.refuses_while_down())
    {
        return Err(Refusal::ClusterUnavailable);
    }
    // Membership: a policy that names a conversations claim lets a token open only those.
    if let (Some(policy), Some(conversation)) = (&route.auth, &identity.conversation)
        && !policy.may_open(&identity.claims, conversation)
    {
        return Err(Refusal::ConversationNotAllowed);
    }
    // An `exp` centuries away (some issuers mint "never expires" tokens) is no deadline; it
    // must neither overflow the clock arithmetic nor wrap around to "now".
    let token_expires_at = identity
        .expires_at
        .filter(|&exp| exp < 32_503_680_000) // year 3000
        .map(|exp| UNIX_EPOCH + Duration::from_secs(exp));

    let affinity = (route.affinity == Affinity::User)
        .then(|| user_key(identity.tenant.as_deref(), &identity.user));
    let Some(websocket_key) = websocket_key else {
        // A plain HTTP request holds a connection slot while it is in flight, and no
        // per-user slot: a user's sockets are what that limit counts.
        let held = Held {
            _connection: connection,
            _user: None,
            lease: None,
        };
        return Ok(Admitted {
            route,
            identity: known.identity.take().unwrap_or_default(),
            token,
            token_expires_at,
            affinity,
            kind: Kind::Http { held },
        });
    };
    let planned = match &route.resume {
        None => Planned::Plain,
        Some(settings) => session_plan::plan(
            &shared.sessions,
            &route.label,
            settings,
            identity,
            query,
            conversation_named,
            shared.cluster.is_some() && pass != Pass::NotElsewhere,
        )?,
    };
    let session = match planned {
        Planned::Resume { entry, last_seq } => SessionPlan::Resume { entry, last_seq },
        Planned::Refuse(why) => SessionPlan::Refuse(why),
        Planned::Elsewhere {
            key,
            last_seq,
            conversation,
        } => SessionPlan::Elsewhere {
            key,
            last_seq,
            conversation,
            connection,
        },
        Planned::Plain => SessionPlan::Connect {
            held: hold(shared, live, identity, connection)?,
            session: None,
        },
        Planned::New { entry, announce } => {
            // Reserved first: a refusal below gives the session's id up again.
            let reservation = Reservation::new(&shared.sessions.registry, &shared.tasks, entry);
            SessionPlan::Connect {
                held: hold(shared, live, identity, connection)?,
                session: Some(NewSession {
                    reservation,
                    announce,
                }),
            }
        }
    };
    Ok(Admitted {
        route,
        identity: known.identity.take().unwrap_or_default(),
        token,
        token_expires_at,
        affinity,
        kind: Kind::WebSocket {
            websocket_key,
            session,
        },
    })
}

/// Whether an operator revoked `identity`'s token or user.
pub(crate) fn revoked(shared: &Shared, identity: &Identity) -> bool {
    !shared.revocations.is_empty()
        && shared.revocations.is_revoked(
            claim_string(&identity.claims, "jti").as_deref(),
            identity.tenant.as_deref(),
            &identity.user,
        )
}

/// The connection slot already taken, and one of the user's own unless they hold the most.
fn hold(
    shared: &Shared,
    live: &Live,
    identity: &Identity,
    connection: OwnedSemaphorePermit,
) -> Result<Held, Refusal> {
    let user = match live.config.server.max_connections_per_user {
        Some(max) if !identity.user.is_empty() => Some(
            shared
                .user_connections
                .acquire(
                    (
                        identity.tenant.clone().unwrap_or_default(),
                        identity.user.clone(),
                    ),
                    max as usize,
                )
                .ok_or(Refusal::TooManyConnections)?,
        ),
        _ => None,
    };
    Ok(Held {
        _connection: connection,
        _user: user,
        lease: None,
    })
}

/// The request's host, lowercase and without a port. A request naming two hosts (a second
/// `Host`, or an absolute-form target beside `Host`) is refused: what one hop reads as the host
/// must be what the next one reads.
fn request_host<B>(request: &Request<B>) -> Result<Option<String>, Refusal> {
    if request.uri().authority().is_some() {
        return Err(Refusal::BadRequest(
            "absolute-form targets are not accepted: send the path, and the host in Host",
        ));
    }
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let raw = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::BadRequest("Host may be given once"));
    }
    // RFC 9112 §3.2: an HTTP/1.1 request without Host is answered 400.
    let Some(raw) = raw else {
        if request.version() < http::Version::HTTP_11 {
            return Ok(None);
        }
        return Err(Refusal::BadRequest(
            "an HTTP/1.1 request needs a Host header",
        ));
    };
    let raw = raw
        .to_str()
        .map_err(|_| Refusal::BadRequest("Host is not plain text"))?;
    let host = match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => raw.rsplit_once(':').map_or(raw, |(host, _port)| host),
    };
    Ok(Some(host.to_ascii_lowercase()))
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    token_source::header_list(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// The client's key when this is a WebSocket upgrade (RFC 6455 §4.2.1); `None` when it does
/// not ask for one (`asks_upgrade`: Connection names `upgrade` and Upgrade `websocket`).
fn websocket_key(
    asks_upgrade: bool,
    method: &Method,
    version: http::Version,
    headers: &HeaderMap,
) -> Result<Option<String>, Refusal> {
    if !asks_upgrade {
        return Ok(None);
    }
    if method != Method::GET {
        return Err(Refusal::BadHandshake("a WebSocket upgrade must be a GET"));
    }
    // RFC 6455 §4.1: HTTP/1.1 or later. An HTTP/1.0 hop in between (a proxy that does not know
    // upgrades) would not carry the socket that follows.
    if version < http::Version::HTTP_11 {
        return Err(Refusal::BadHandshake("a WebSocket upgrade needs HTTP/1.1"));
    }
    // The bytes after an upgrade's head are frames: a body announced as well makes two readings
    // of the same bytes (what one hop takes for a body, the next takes for frames).
    let announces_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|length| length.as_bytes() != b"0");
    if announces_body {
        return Err(Refusal::BadHandshake("a WebSocket upgrade has no body"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(Refusal::UpgradeRequired);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|key| key.len() == 24)
        .ok_or(Refusal::BadHandshake(
            "missing or malformed Sec-WebSocket-Key",
        ))?;
    Ok(Some(key.to_owned()))
}
