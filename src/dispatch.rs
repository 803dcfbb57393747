//! Every request the listener reads: admitted or refused, then upgraded to a WebSocket, proxied
//! as plain HTTP, or — a CORS preflight — answered by the edge itself.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::{Body, Frame, SizeHint};

use crate::admission::{self, Admitted, ClientConn, Kind, Pass, Rejected, SessionPlan};
use crate::auth::jwks::UNKNOWN_KID_WAIT;
use crate::auth::memo::TokenMemo;
use crate::cors;
use crate::forward::{X_REQUEST_ID, header_value};
use crate::handoff::{self, Elsewhere};
use crate::handshake::{self, Reply, WebSocket};
use crate::passthrough::body::{ClientBody, ResponseBody};
use crate::passthrough::{self, Proxy};
use crate::report;
use crate::state::Shared;
use crate::upstream::h1::BoxError;

/// The body of any response the edge sends: its own, whole, or an upstream's, streaming.
// Moved once, into hyper: a few hundred bytes copied cost less than an allocation per response.
#[allow(clippy::large_enum_variant)]
pub(crate) enum EdgeBody {
    Full(Full<Bytes>),
    Proxied(ResponseBody),
}

impl Body for EdgeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            EdgeBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(|never| match never {}))),
            EdgeBody::Proxied(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EdgeBody::Full(full) => full.is_end_stream(),
            EdgeBody::Proxied(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            EdgeBody::Full(full) => full.size_hint(),
            EdgeBody::Proxied(body) => body.size_hint(),
        }
    }
}

pub(crate) async fn handle(
    mut request: Request<ClientBody>,
    conn: ClientConn,
    shared: Arc<Shared>,
    memo: Arc<TokenMemo>,
) -> Result<Response<EdgeBody>, Infallible> {
    let started = Instant::now();
    let request_id = admission::request_id(request.headers());
    let mut live = shared.live.load_full();
    let mut admitted = admission::admit(&request, conn, &shared, &live, &memo, Pass::First);
    // A token signed with a key the set lacks: the identity provider may have rotated its
    // keys. The set is fetched again (or a fetch under way joined), and the token judged once
    // more, on the config as it is then; when no fetch is allowed now, the refusal stands.
    if let Err(rejected) = &mut admitted
        && let Some(refetch) = rejected.refetch.take()
        && refetch
            .keys
            .refetch_for_unknown_kid(refetch.seen, UNKNOWN_KID_WAIT)
            .await
    {
        drop(admitted);
        live = shared.live.load_full();
        admitted = admission::admit(&request, conn, &shared, &live, &memo, Pass::Again);
    }
    let mut admitted = match admitted {
        Ok(admitted) => admitted,
        Err(rejected) => {
            let response =
                report::refused(&shared, &request_id, conn, request.uri(), started, rejected);
            return Ok(response.map(EdgeBody::Full));
        }
    };
    // A resume of a session this edge does not know: another edge of the cluster may hold it.
    // When none does, the handshake is judged as one of this edge's own.
    if let Kind::WebSocket {
        session: SessionPlan::Elsewhere { .. },
        ..
    } = &admitted.kind
    {
        if let Some(response) =
            carry(&mut request, &shared, conn, &request_id, started, admitted).await
        {
            return Ok(response.map(EdgeBody::Full));
        }
        admitted = match admission::admit(&request, conn, &shared, &live, &memo, Pass::NotElsewhere)
        {
            Ok(admitted) => admitted,
            Err(rejected) => {
                let response =
                    report::refused(&shared, &request_id, conn, request.uri(), started, rejected);
                return Ok(response.map(EdgeBody::Full));
            }
        };
    }
    let Admitted {
        route,
        identity,
        token,
        token_expires_at,
        affinity,
        kind,
    } = admitted;
    let response = match kind {
        Kind::Preflight => {
            report::preflight(&shared, route, &request_id, conn);
            let allowed = route.allowed_origins.as_deref().unwrap_or_default();
            let mut response = cors::preflight(&request, allowed);
            response
                .headers_mut()
                .insert(X_REQUEST_ID, header_value(&request_id));
            response.map(EdgeBody::Full)
        }
        Kind::WebSocket {
            websocket_key,
            session,
        } => {
            let websocket = WebSocket {
                conn,
                route,
                identity,
                token,
                token_expires_at,
                affinity,
                websocket_key,
                session,
                request_id: &request_id,
                started,
            };
            handshake::upgrade(request, &shared, websocket)
                .await
                .map(EdgeBody::Full)
        }
        Kind::Http { held } => {
            let uri = request.uri().clone();
            let proxy = Proxy {
                conn,
                route,
                identity: &identity,
                token_expires_at,
                affinity,
                held,
                request_id: &request_id,
                started,
            };
            match passthrough::proxy(request, &shared, proxy).await {
                Ok(response) => response.map(EdgeBody::Proxied),
                Err(refusal) => {
                    let rejected = Rejected {
                        refusal,
                        route: Some(route.label.clone()),
                        identity: Some(Box::new(identity)),
                        http: true,
                        refetch: None,
                    };
                    report::refused(&shared, &request_id, conn, &uri, started, rejected)
                        .map(EdgeBody::Full)
                }
            }
        }
    };
    Ok(response)
}

/// Carries a resume to the edge that holds its session, if another does.
async fn carry(
    request: &mut Request<ClientBody>,
    shared: &Arc<Shared>,
    conn: ClientConn,
    request_id: &str,
    started: Instant,
    admitted: Admitted<'_>,
) -> Option<Response<Full<Bytes>>> {
    let Admitted {
        route,
        identity,
        token,
        kind:
            Kind::WebSocket {
                websocket_key,
                session:
                    SessionPlan::Elsewhere {
                        key,
                        last_seq,
                        conversation,
                        connection,
                    },
            },
        ..
    } = admitted
    else {
        return None;
    };
    let elsewhere = Elsewhere {
        conn,
        route,
        identity: &identity,
        key,
        last_seq,
        conversation,
        connection,
        reply: Reply {
            websocket_key: &websocket_key,
            token: token.as_ref(),
            request_id,
            forward_token: route.forward_token,
        },
        started,
    };
    handoff::carry(request, shared, elsewhere).await
}
