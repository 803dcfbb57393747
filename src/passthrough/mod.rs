//! HTTP next to the socket (`http = "proxy"`): a plain request on a route — REST, Server-Sent
//! Events, a long-poll, Engine.IO's polling transport — admitted like an upgrade, shaped like
//! one (identity injected, token removed, forwarding headers), and passed to the same upstream
//! over pooled HTTP/1.1, its bodies streamed both ways frame by frame ([`body`]). CORS for
//! routes with `allowed_origins` is answered here ([`cors`]).

pub(crate) mod body;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Body;

use crate::admission::refusal::Refusal;
use crate::admission::{ClientConn, Held};
use crate::auth::Identity;
use crate::auth::token_source;
use crate::cors;
use crate::forward::{self, X_REQUEST_ID, header_value};
use crate::report::{Ending, HttpExchange, Proxied};
use crate::route::Route;
use crate::state::Shared;
use crate::upstream::http::{Answered, HttpError, Outgoing, send};
use body::{BodyFault, ClientBody, Finished, Progress, RequestBody, ResponseBody};

/// An admitted plain request on its way upstream.
pub(crate) struct Proxy<'a> {
    pub(crate) conn: ClientConn,
    pub(crate) route: &'a Route,
    pub(crate) identity: &'a Identity,
    pub(crate) token_expires_at: Option<SystemTime>,
    pub(crate) affinity: Option<u64>,
    pub(crate) held: Held,
    pub(crate) request_id: &'a str,
    pub(crate) started: Instant,
}

/// Response headers that belong to one hop (RFC 9110 §7.6.1): the client's connection is the
/// edge's to describe.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];

/// Passes `request` on to the route's upstream and returns its response, streaming; or the
/// refusal the client gets instead (nothing of a refused request reaches the upstream, but for
/// a body the upstream had begun to take when it turned out too large).
pub(crate) async fn proxy(
    request: Request<ClientBody>,
    shared: &Arc<Shared>,
    proxy: Proxy<'_>,
) -> Result<Response<ResponseBody>, Refusal> {
    let Proxy {
        conn,
        route,
        identity,
        token_expires_at,
        affinity,
        held,
        request_id,
        started,
    } = proxy;
    let (Some(settings), Some(clients)) = (&route.http, &route.http_clients) else {
        return Err(Refusal::UpgradeRequired);
    };
    // When the client says how much it sends, a body too large never goes upstream.
    if request
        .body()
        .size_hint()
        .exact()
        .is_some_and(|length| length > settings.max_body_size)
    {
        return Err(Refusal::BodyTooLarge);
    }
    let shaped = forward::shape(&request, route, identity, conn.peer, conn.tls, request_id)?;
    // CORS: a response to an origin the route allows says so (others were refused).
    let origin = route
        .allowed_origins
        .is_some()
        .then(|| request.headers().get(header::ORIGIN).cloned())
        .flatten();
    let (parts, incoming) = request.into_parts();
    let progress = Progress::default();
    let body = (!incoming.is_end_stream()).then(|| {
        let length = incoming.size_hint().exact();
        let body = RequestBody::new(
            incoming,
            settings.max_body_size,
            settings.timeout,
            progress.clone(),
        );
        (body.boxed_unsync(), length)
    });
    let outgoing = Outgoing {
        method: &parts.method,
        shaped: &shaped,
        body,
        timeout: settings.timeout,
        affinity,
        request_id,
    };
    let Answered {
        head,
        url,
        connection,
    } = send(route, &route.targets, clients, outgoing)
        .await
        .map_err(|error| refusal_for(&error, &progress, request_id))?;

    let mut response = Response::new(());
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers;
    let (mut head, ()) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    if let Some(allowed) = &route.allowed_origins {
        cors::allow(&mut head.headers, allowed, origin.as_ref());
    }
    head.headers.insert(X_REQUEST_ID, header_value(request_id));
    let exchange = HttpExchange::answered(
        shared,
        Proxied {
            request_id,
            conn,
            route,
            identity,
            method: parts.method,
            path: parts.uri.path(),
            status: head.status,
            upstream: url,
            started,
            held,
        },
    );
    let finished = Box::new(Exchange { exchange, progress });
    // A streaming response ends when the token expires, as a socket gets 4001 then.
    let expires = route.lifecycle.token_deadline(token_expires_at);
    let event_stream = is_event_stream(&head.headers);
    let body = ResponseBody::new(
        connection,
        settings.timeout,
        expires,
        event_stream,
        finished,
    );
    Ok(Response::from_parts(head, body))
}

/// What a client gets when its request got no response: its own body's fault first.
fn refusal_for(error: &HttpError, progress: &Progress, request_id: &str) -> Refusal {
    match progress.fault() {
        Some(BodyFault::TooLarge) => return Refusal::BodyTooLarge,
        Some(BodyFault::Stalled) => return Refusal::RequestTimeout,
        Some(BodyFault::Broken) => {
            return Refusal::BadRequest("the request body was cut off or malformed");
        }
        None => {}
    }
    tracing::warn!(request_id = %request_id, %error, "proxied request failed");
    match error {
        HttpError::Unreachable => Refusal::UpstreamUnreachable,
        HttpError::Timeout => Refusal::UpstreamTimeout,
        HttpError::Failed(_) => Refusal::UpstreamFailed,
    }
}

/// Whether a response is a stream of Server-Sent Events.
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.as_bytes().split(|&b| b == b';').next())
        .is_some_and(|media| {
            media
                .trim_ascii()
                .eq_ignore_ascii_case(b"text/event-stream")
        })
}

/// Removes the headers of the upstream's hop, and those its `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let hop_by_hop = |name: &HeaderName| {
        HOP_BY_HOP.contains(name) || name == "keep-alive" || name == "proxy-connection"
    };
    // Most responses carry none: one look at the names instead of a lookup for each.
    if !headers.keys().any(hop_by_hop) {
        return;
    }
    let nominated: Vec<HeaderName> = token_source::header_list(headers, header::CONNECTION)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&nominated) {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
}

/// The report of an exchange, told the request body's bytes when the response ends.
struct Exchange {
    exchange: HttpExchange,
    progress: Progress,
}

impl Finished for Exchange {
    fn finished(self: Box<Self>, bytes: u64, ending: Ending) {
        let Exchange { exchange, progress } = *self;
        exchange.finished(progress.bytes(), bytes, ending);
    }
}
