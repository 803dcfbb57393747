//! A resuming client carried between edges. The edge it reached (it knows no such session)
//! asks the cluster's directory which edge holds the session, asks that edge over the link to
//! take the client, answers the client's upgrade, and from then on passes bytes both ways
//! unread. The owner hands the link to the session as the client's socket: the session replays
//! what the client missed and goes on live, and its upstream never sees a second connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::HeaderValue;
use http::{Request, Response};
use http_body_util::Full;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::admission::ClientConn;
use crate::admission::Rejected;
use crate::admission::refusal::Refusal;
use crate::auth::Identity;
use crate::auth::claims::claim_string;
use crate::auth::token_source;
use crate::cluster::wire::{self, Declined, LINK_TIMEOUT, LinkError, LinkRequest};
use crate::connections::TokenFacts;
use crate::handshake::{self, Reply};
use crate::metrics::{GaugeGuard, ResultLabels, SideLabels};
use crate::passthrough::body::ClientBody;
use crate::report;
use crate::route::Route;
use crate::session::registry::{Attach, SessionKey};
use crate::state::Shared;
use crate::ws::close::NotResumable;
use crate::ws::io::Io;
use crate::ws::leg::{CLOSE_TIMEOUT, Leg};

/// A resume of a session this edge does not hold.
pub(crate) struct Elsewhere<'a> {
    pub(crate) conn: ClientConn,
    pub(crate) route: &'a Route,
    pub(crate) identity: &'a Identity,
    pub(crate) key: SessionKey,
    pub(crate) last_seq: u64,
    pub(crate) conversation: Option<String>,
    /// Its `max_connections` slot here, held while its bytes pass through.
    pub(crate) connection: OwnedSemaphorePermit,
    pub(crate) reply: Reply<'a>,
    pub(crate) started: Instant,
}

fn count(shared: &Shared, result: &'static str) {
    shared
        .metrics
        .cluster
        .remote_resumes
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// Carries the client to the edge holding its session: the 101 (or the 101 and 4002 when the
/// owner says the session cannot be had). `None` when no other edge holds it (or the one that
/// did cannot be reached): the handshake is then judged as one of this edge's own.
pub(crate) async fn carry(
    request: &mut Request<ClientBody>,
    shared: &Arc<Shared>,
    elsewhere: Elsewhere<'_>,
) -> Option<Response<Full<Bytes>>> {
    let cluster = shared.cluster.as_ref()?;
    let Elsewhere {
        conn,
        route,
        identity,
        key,
        last_seq,
        conversation,
        connection,
        reply,
        started: admitted_at,
    } = elsewhere;
    let owner = cluster.find_session(&key).await.ok()??;
    let started = Instant::now();
    let asked = LinkRequest {
        route: key.route.clone(),
        tenant: key.tenant.clone(),
        user: key.user.clone(),
        session_id: key.id.clone(),
        last_seq,
        conversation,
        token_expires_at: identity.expires_at,
        jti: claim_string(&identity.claims, "jti"),
        request_id: reply.request_id.to_owned(),
        from: cluster.instance.clone(),
        sent_at: 0,
    }
    .stamped();
    let (link, from_owner, protocol) = match wire::ask(
        &owner.link,
        &cluster.settings.secret,
        &asked,
    )
    .await
    {
        Ok(linked) => linked,
        // The owner no longer knows it (the session ended, and the directory's entry has yet
        // to lapse): judged here, as a session no edge holds.
        Err(LinkError::Refused(NotResumable::Unknown)) => {
            count(shared, NotResumable::Unknown.label());
            return None;
        }
        Err(LinkError::Revoked) => {
            count(shared, "revoked");
            let rejected = Rejected {
                refusal: Refusal::TokenRevoked,
                route: Some(route.label.clone()),
                identity: Some(Box::new(identity.clone())),
                http: false,
                refetch: None,
            };
            return Some(report::refused(
                shared,
                reply.request_id,
                conn,
                request.uri(),
                admitted_at,
                rejected,
            ));
        }
        Err(LinkError::Refused(why)) => {
            count(shared, why.label());
            return Some(handshake::not_resumable(
                request, shared, route, why, identity, conn, &reply,
            ));
        }
        Err(error) => {
            count(shared, "owner_unreachable");
            tracing::warn!(request_id = %reply.request_id, owner = %owner.instance, %error, "cluster: the edge holding the session cannot be reached; judged here");
            return None;
        }
    };
    count(shared, "carried");
    shared
        .metrics
        .handshake(&route.label, 101, "resumed_elsewhere");
    tracing::info!(request_id = %reply.request_id, route = %route.label, session = %key.id, last_seq, owner = %owner.instance, took_ms = started.elapsed().as_millis() as u64, "resuming at another edge");
    // The subprotocol the session's upstream chose, if this client offers it again.
    let protocol = protocol
        .filter(|chosen| {
            token_source::offered_subprotocols(request.headers()).any(|offered| chosen == offered)
        })
        .and_then(|chosen| HeaderValue::from_str(&chosen).ok());
    let response = handshake::switching_protocols(&reply, protocol.as_ref());
    let on_upgrade = hyper::upgrade::on(request);
    let gauge = shared
        .metrics
        .cluster
        .links
        .get_or_create(&SideLabels { side: "out" })
        .clone();
    let shutdown = shared.shutdown.clone();
    shared.tasks.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            // The client vanished: the owner's session finds its link closed, and waits.
            return;
        };
        let _held = (GaugeGuard::new(gauge), connection);
        let (client, from_client) = Io::from_upgraded(upgraded);
        pipe(client, from_client, link, from_owner, shutdown).await;
    });
    Some(response)
}

/// Passes bytes both ways; what either side sent before the pipe began goes first. Each
/// direction ends on its own: an end of one side's bytes is passed on as the end of the other
/// side's (a close frame's answer still reaches the side that closed first), and once one
/// direction has ended the other gets `CLOSE_TIMEOUT` to follow, so that a peer that never
/// closes holds nothing. An error on either side ends both: the session waits for the client
/// as for any that vanished. At the edge's drain the pipe is cut: the client resumes elsewhere.
async fn pipe(
    mut client: Io,
    from_client: Bytes,
    mut link: TcpStream,
    from_owner: Bytes,
    shutdown: crate::shutdown::Shutdown,
) {
    if link.write_all(&from_client).await.is_err() || client.write_all(&from_owner).await.is_err() {
        return;
    }
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut link_read, mut link_write) = link.split();
    let up = async {
        tokio::io::copy(&mut client_read, &mut link_write).await?;
        link_write.shutdown().await
    };
    let down = async {
        tokio::io::copy(&mut link_read, &mut client_write).await?;
        client_write.shutdown().await
    };
    tokio::pin!(up, down);
    let rest = tokio::select! {
        ended = &mut up => ended.is_ok().then_some(down.as_mut().left_future()),
        ended = &mut down => ended.is_ok().then_some(up.as_mut().right_future()),
        () = shutdown.clone().cancelled_owned() => None,
    };
    if let Some(rest) = rest {
        tokio::select! {
            _ = tokio::time::timeout(CLOSE_TIMEOUT, rest) => {}
            () = shutdown.cancelled_owned() => {}
        }
    }
}

/// Serves the link: other edges' clients handed to this edge's sessions.
pub(crate) async fn serve_link(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                shared
                    .tasks
                    .spawn(take_client(stream, peer, shared.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "cluster link: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One other edge's request: the session named takes the client, or the asking edge is told
/// why not.
async fn take_client(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let Some(cluster) = shared.cluster.clone() else {
        return;
    };
    let read = tokio::time::timeout(
        LINK_TIMEOUT,
        wire::read_request(&mut stream, &cluster.settings.secret),
    )
    .await;
    let read = read.map(|read| {
        read.and_then(|received| {
            if cluster.taken_links.first_use(&received.signature) {
                Ok(received)
            } else {
                Err(wire::BadRequest::Replayed)
            }
        })
    });
    let (asked, from_client) = match read {
        Ok(Ok(received)) => (received.request, received.rest),
        Ok(Err(error)) => {
            count(&shared, "bad_request");
            tracing::warn!(client = %peer, %error, "cluster link: refused a request");
            return;
        }
        Err(_) => return,
    };
    let live = shared.live.load_full();
    let key = SessionKey {
        route: asked.route.clone(),
        tenant: asked.tenant.clone(),
        user: asked.user.clone(),
        id: asked.session_id.clone(),
    };
    let found = match live.router.by_label(&asked.route) {
        None => Err(NotResumable::Unknown),
        Some(route) => shared.sessions.registry.find(&key).and_then(|entry| {
            if asked
                .conversation
                .as_ref()
                .is_some_and(|named| entry.conversation.as_ref() != Some(named))
            {
                return Err(NotResumable::Conversation);
            }
            entry.check(asked.last_seq)?;
            Ok((route, entry))
        }),
    };
    let (route, entry) = match found {
        Ok(found) => found,
        Err(why) => {
            shared.metrics.resume(&asked.route, why.label());
            let _ = wire::answer(&mut stream, Err(Declined::Session(why))).await;
            return;
        }
    };
    // The asking edge checked its own copy; this edge may have heard of a revocation first.
    let tenant = (!asked.tenant.is_empty()).then_some(asked.tenant.as_str());
    if shared
        .revocations
        .is_revoked(asked.jti.as_deref(), tenant, &asked.user)
    {
        count(&shared, "revoked");
        let _ = wire::answer(&mut stream, Err(Declined::Revoked)).await;
        return;
    }
    let protocol = entry.protocol.get().cloned().flatten();
    let protocol = protocol.as_ref().and_then(|p| p.to_str().ok());
    if wire::answer(&mut stream, Ok(protocol)).await.is_err() {
        return;
    }
    count(&shared, "taken");
    tracing::info!(request_id = %asked.request_id, route = %route.label, session = %key.id, last_seq = asked.last_seq, from = %asked.from, "resuming a client of another edge");
    let token_expires_at = asked
        .token_expires_at
        .filter(|&exp| exp < 32_503_680_000) // year 3000, as at admission
        .map(|exp| UNIX_EPOCH + Duration::from_secs(exp));
    let attach = Attach {
        leg: Leg::client(Io::Tcp(stream), &from_client, route.max_message_size),
        last_seq: asked.last_seq,
        token_expires_at,
        token: TokenFacts {
            jti: asked.jti.clone(),
            expires_at: asked.token_expires_at,
        },
        request_id: asked.request_id,
    };
    handshake::hand_to_session(&shared, &entry, attach, &route.label).await;
}
