//! The WebSocket upgrade: an admitted request is connected to its upstream, answered with 101,
//! and — once hyper hands over the client's socket — relayed. Also a client coming back to its
//! session (101 at once: the session's upstream is already there), and one that cannot have the
//! session it asked for (101, then 4002).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::upgrade::Upgraded;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::admission::refusal::Refusal;
use crate::admission::{self, ClientConn, Held, NewSession, Rejected, SessionPlan};
use crate::auth::Identity;
use crate::auth::claims::claim_string;
use crate::auth::token_source::{self, FoundToken, SUBPROTOCOL_PREFIX, TokenSource};
use crate::cluster::leases::NoLease;
use crate::connections::{Holder, TokenFacts};
use crate::forward::{self, X_REQUEST_ID, header_value};
use crate::metrics::GaugeGuard;
use crate::passthrough::body::ClientBody;
use crate::relay::{Counters, Relay, RelayParams};
use crate::report::{self, Connected, ConnectionReport};
use crate::route::Route;
use crate::session::registry::{Attach, Delivery, SessionEntry, close_not_resumable};
use crate::session::resumable::Resumable;
use crate::state::Shared;
use crate::upstream::websocket;
use crate::ws::close::{EdgeClose, Finish, NotResumable};
use crate::ws::io::Io;
use crate::ws::leg::{CLOSE_TIMEOUT, Leg, close_leg};

/// An admitted WebSocket upgrade.
pub(crate) struct WebSocket<'a> {
    pub(crate) conn: ClientConn,
    pub(crate) route: &'a Route,
    pub(crate) identity: Identity,
    pub(crate) token: Option<FoundToken>,
    pub(crate) token_expires_at: Option<SystemTime>,
    pub(crate) affinity: Option<u64>,
    pub(crate) websocket_key: String,
    pub(crate) session: SessionPlan<'a>,
    pub(crate) request_id: &'a str,
    pub(crate) started: Instant,
}

/// Answers an admitted upgrade: 101 (with the relay to follow), or the upstream's refusal.
pub(crate) async fn upgrade(
    mut request: Request<ClientBody>,
    shared: &Arc<Shared>,
    websocket: WebSocket<'_>,
) -> Response<Full<Bytes>> {
    let WebSocket {
        conn,
        route,
        identity,
        token,
        token_expires_at,
        affinity,
        websocket_key,
        session,
        request_id,
        started,
    } = websocket;
    let reply = Reply {
        websocket_key: &websocket_key,
        token: token.as_ref(),
        request_id,
        forward_token: route.forward_token,
    };
    match session {
        SessionPlan::Resume { entry, last_seq } => {
            // The session's registry entry holds the token its client holds now.
            resume(
                &mut request,
                shared,
                route,
                Resuming {
                    entry,
                    last_seq,
                    token_expires_at,
                    token: token_facts(&identity),
                },
                &reply,
            )
        }
        SessionPlan::Refuse(why) => {
            not_resumable(&mut request, shared, route, why, &identity, conn, &reply)
        }
        // Asked of the cluster before the upgrade (`handoff`); what reaches here is unknown.
        SessionPlan::Elsewhere { .. } => not_resumable(
            &mut request,
            shared,
            route,
            NotResumable::Unknown,
            &identity,
            conn,
            &reply,
        ),
        SessionPlan::Connect { held, session } => {
            let upgrade = Upgrade {
                conn,
                route,
                identity: &identity,
                token_expires_at,
                affinity,
                held,
                session,
            };
            match connect(&mut request, shared, upgrade, &reply).await {
                Ok(response) => response,
                Err(refusal) => {
                    let rejected = Rejected {
                        refusal,
                        route: Some(route.label.clone()),
                        identity: Some(Box::new(identity)),
                        http: false,
                        refetch: None,
                    };
                    report::refused(shared, request_id, conn, request.uri(), started, rejected)
                }
            }
        }
    }
}

/// What every 101 of a handshake is built from.
pub(crate) struct Reply<'a> {
    pub(crate) websocket_key: &'a str,
    pub(crate) token: Option<&'a FoundToken>,
    pub(crate) request_id: &'a str,
    pub(crate) forward_token: bool,
}

/// An admitted connection on its way upstream.
struct Upgrade<'a> {
    conn: ClientConn,
    route: &'a Route,
    identity: &'a Identity,
    token_expires_at: Option<SystemTime>,
    affinity: Option<u64>,
    held: Held,
    session: Option<NewSession<'a>>,
}

/// The client's leg once hyper hands its socket over after the 101; `None` when the client
/// vanished in between.
pub(crate) fn client_leg(
    upgraded: Result<Upgraded, hyper::Error>,
    max_message: usize,
) -> Option<Leg> {
    match upgraded {
        Ok(upgraded) => {
            let (io, initial) = Io::from_upgraded(upgraded);
            Some(Leg::client(io, &initial, max_message))
        }
        Err(error) => {
            tracing::debug!(%error, "client vanished during the upgrade");
            None
        }
    }
}

/// Connects the upstream, answers 101 and starts the relay for when the socket is handed over.
/// On any refusal the new session's reservation is dropped, and with it the session's id.
async fn connect(
    request: &mut Request<ClientBody>,
    shared: &Arc<Shared>,
    upgrade: Upgrade<'_>,
    reply: &Reply<'_>,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let Upgrade {
        conn,
        route,
        identity,
        token_expires_at,
        affinity,
        mut held,
        session,
    } = upgrade;
    // Across the cluster's edges the user's count is a lease in Redis (this edge's own count
    // was taken at admission and holds as well).
    let max_per_user = shared.live.load().config.server.max_connections_per_user;
    if let (Some(cluster), Some(max)) = (&shared.cluster, max_per_user)
        && !identity.user.is_empty()
    {
        let tenant = identity.tenant.as_deref().unwrap_or("");
        let lease = cluster
            .lease(tenant, &identity.user, max)
            .await
            .map_err(|no_lease| match no_lease {
                NoLease::Full => Refusal::TooManyConnections,
                NoLease::Unavailable => Refusal::ClusterUnavailable,
            })?;
        held.lease = Some(lease);
    }
    let session_id = session
        .as_ref()
        .and_then(|session| session.reservation.entry())
        .map(|entry| entry.key.id.clone());
    let shaped = forward::shape(
        request,
        route,
        identity,
        conn.peer,
        conn.tls,
        reply.request_id,
    )?;
    // Registered for the admin API when it exists (or another edge's, through the cluster):
    // without it nobody could find the entry, and every idle connection would carry it.
    let api = shared.cluster.is_some()
        || shared
            .live
            .load()
            .config
            .admin
            .as_ref()
            .is_some_and(|admin| admin.token.is_some());
    let registered = api.then(|| {
        let holder = Holder {
            request_id: reply.request_id.to_owned(),
            route: route.label.clone(),
            user: identity.user.clone(),
            tenant: identity.tenant.clone(),
            conversation: identity.conversation.clone(),
            session_id: session_id.clone(),
        };
        shared.connections.register(holder, token_facts(identity))
    });
    // A revocation made between the admission's check and this registration found no entry
    // to close: look again now that a disconnect would find it.
    if let Some(registered) = &registered
        && admission::revoked(shared, identity)
    {
        registered.connection.revoke.turn_on();
    }
    let connect_started = Instant::now();
    let upstream =
        websocket::connect_any(route, &route.targets, affinity, &shaped, reply.request_id).await?;
    let response = switching_protocols(reply, upstream.protocol.as_ref());
    let report = ConnectionReport::connected(
        shared,
        Connected {
            request_id: reply.request_id,
            conn,
            route,
            identity,
            session_id: session_id.as_deref(),
            upstream: &upstream.url,
            connect_took: connect_started.elapsed(),
        },
    );

    let kept = session.and_then(|session| Some((session.reservation.keep()?, session.announce)));
    let (resume, announce) = match (kept, &route.resume) {
        (Some((entry, announce)), Some(settings)) => {
            let _ = entry.protocol.set(upstream.protocol.clone());
            if let Some(cluster) = &shared.cluster {
                cluster.announce_session(&entry.key);
            }
            let resumable = Resumable::new(
                settings.clone(),
                entry,
                shared.sessions.clone(),
                route.label.clone(),
                report.who(),
            );
            (Some(Box::new(resumable)), announce)
        }
        _ => (None, None),
    };
    let metrics = route.metrics(&shared.metrics);
    let max_message = route.max_message_size;
    let upstream_leg = Leg::upstream(upstream.io, &upstream.leftover, max_message);
    let params = RelayParams {
        lifecycle: route.lifecycle.clone(),
        max_message,
        token_expires_at,
        counters: Counters {
            client_to_upstream: metrics.client_to_upstream.clone(),
            upstream_to_client: metrics.upstream_to_client.clone(),
            turns: Some(metrics.turns.clone()),
        },
        shutdown: shared.shutdown.clone(),
        tasks: shared.tasks.clone(),
        resume,
        announce,
        registered: registered
            .as_ref()
            .map(|registered| registered.connection.clone()),
    };
    shared.stats.opened();
    let holds = (
        shared.stats.open_guard(),
        held,
        GaugeGuard::new(metrics.open.clone()),
        registered,
    );
    let shared_after = shared.clone();
    // Combinators rather than an `async` block: an async block awaiting a future it holds
    // keeps room for it twice, and every open connection pays for that.
    let relay = hyper::upgrade::on(request)
        .map(move |upgraded| client_leg(upgraded, max_message))
        .then(move |client| Relay::new(client, upstream_leg, params))
        .map(move |relay_report| {
            report.finished(relay_report, &shared_after);
            drop(holds);
        });
    shared.tasks.spawn(relay);
    Ok(response)
}

/// A client coming back to a live session of this edge's.
struct Resuming {
    entry: Arc<SessionEntry>,
    last_seq: u64,
    token_expires_at: Option<SystemTime>,
    token: TokenFacts,
}

/// A client coming back: a 101 at once (the session's upstream is already there), then its
/// socket is handed to the session, which replays what it missed.
fn resume(
    request: &mut Request<ClientBody>,
    shared: &Arc<Shared>,
    route: &Route,
    resuming: Resuming,
    reply: &Reply<'_>,
) -> Response<Full<Bytes>> {
    let Resuming {
        entry,
        last_seq,
        token_expires_at,
        token,
    } = resuming;
    // The subprotocol the upstream chose for the session, if this client offers it again.
    let protocol = entry.protocol.get().cloned().flatten().filter(|chosen| {
        token_source::offered_subprotocols(request.headers())
            .any(|offered| chosen.as_bytes() == offered.as_bytes())
    });
    let response = switching_protocols(reply, protocol.as_ref());
    report::resuming(shared, route, reply.request_id, &entry.key.id, last_seq);
    let on_upgrade = hyper::upgrade::on(request);
    let max_message = route.max_message_size;
    let request_id = reply.request_id.to_owned();
    let shared_in_task = shared.clone();
    let route_label = route.label.clone();
    shared.tasks.spawn(async move {
        let Some(leg) = client_leg(on_upgrade.await, max_message) else {
            return;
        };
        let attach = Attach {
            leg,
            last_seq,
            token_expires_at,
            token,
            request_id,
        };
        hand_to_session(&shared_in_task, &entry, attach, &route_label).await;
    });
    response
}

/// Gives a client coming back to its session, or tells it why the session cannot have it.
pub(crate) async fn hand_to_session(
    shared: &Shared,
    entry: &SessionEntry,
    attach: Attach,
    route_label: &str,
) {
    match entry.deliver(Box::new(attach)) {
        Delivery::Delivered => {}
        // Two reconnects raced: this one takes the session, the earlier one is told.
        Delivery::Replaced(earlier) => {
            let taken_over = Finish::Send(EdgeClose::TakenOver);
            close_leg(earlier.leg, taken_over, CLOSE_TIMEOUT, true).await;
        }
        // The session ended between the check and now; the registry knows how.
        Delivery::Ended(returned) => {
            let why = shared
                .sessions
                .registry
                .find(&entry.key)
                .err()
                .unwrap_or(NotResumable::Expired);
            shared.metrics.resume(route_label, why.label());
            close_not_resumable(returned.leg, why).await;
        }
    }
}

/// A session that cannot be resumed: upgraded, then closed with 4002 and the reason. A close
/// code is what a browser can read; an HTTP refusal would reach its script as a bare 1006.
pub(crate) fn not_resumable(
    request: &mut Request<ClientBody>,
    shared: &Arc<Shared>,
    route: &Route,
    why: NotResumable,
    identity: &Identity,
    conn: ClientConn,
    reply: &Reply<'_>,
) -> Response<Full<Bytes>> {
    // Browsers fail a socket whose offered subprotocols all go unanswered before reading any
    // close code: answer with the first one offered (the socket is closed at once anyway).
    let first_offered = token_source::offered_subprotocols(request.headers())
        .find(|entry| !entry.starts_with(SUBPROTOCOL_PREFIX))
        .and_then(|entry| HeaderValue::from_str(entry).ok());
    let response = switching_protocols(reply, first_offered.as_ref());
    report::not_resumable(shared, route, reply.request_id, conn, identity, why);
    let on_upgrade = hyper::upgrade::on(request);
    let max_message = route.max_message_size;
    shared.tasks.spawn(async move {
        if let Some(leg) = client_leg(on_upgrade.await, max_message) {
            close_not_resumable(leg, why).await;
        }
    });
    response
}

pub(crate) fn switching_protocols(
    reply: &Reply<'_>,
    chosen: Option<&HeaderValue>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        header_value(&derive_accept_key(reply.websocket_key.as_bytes())),
    );
    headers.insert(X_REQUEST_ID, header_value(reply.request_id));
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

/// The token a connection's identity came from, for the registry.
pub(crate) fn token_facts(identity: &Identity) -> TokenFacts {
    TokenFacts {
        jti: claim_string(&identity.claims, "jti"),
        expires_at: identity.expires_at,
    }
}
