//! Plain HTTP to a route's targets: a pool of keep-alive HTTP/1.1 connections per target
//! ([`super::pool`]), and the next target tried when a request can be sent again.

use std::future::poll_fn;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::body::Incoming;

use super::pool::{Pool, UpstreamBody, UpstreamConnection, sweep_while_alive};
use super::targets::Targets;
use crate::config::settings::{RouteSettings, TargetSettings};
use crate::forward::ShapedRequest;

/// Errors a body passed through may end with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The pools of one route, one per target, in the order of its targets.
pub(crate) struct HttpClients {
    pools: Box<[Arc<Pool>]>,
}

impl HttpClients {
    pub(crate) fn new(route: &RouteSettings) -> Self {
        let pools: Box<[Arc<Pool>]> = route
            .targets
            .iter()
            .map(|target| Pool::new(target.clone(), route.connect_timeout))
            .collect();
        sweep_while_alive(pools.iter().map(Arc::downgrade).collect());
        Self { pools }
    }
}

/// Why a proxied request got no response from any target.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    #[error("upstream unreachable")]
    Unreachable,
    #[error("upstream did not answer in time")]
    Timeout,
    #[error("upstream failed: {0}")]
    Failed(BoxError),
}

/// What a request is sent with.
pub(crate) struct Outgoing<'a> {
    pub(crate) method: &'a Method,
    pub(crate) shaped: &'a ShapedRequest,
    /// `None` for a request without a body: it can be sent to another target when the first
    /// one cannot be reached.
    pub(crate) body: Option<UpstreamBody>,
    /// How long to wait for the response head.
    pub(crate) timeout: Duration,
    pub(crate) affinity: Option<u64>,
    pub(crate) request_id: &'a str,
}

/// The upstream's response, which target sent it, and the connection its body comes on (the
/// body moves only while that connection is driven).
pub(crate) struct Answered<'a> {
    pub(crate) response: Response<Incoming>,
    pub(crate) url: &'a str,
    pub(crate) connection: UpstreamConnection,
}

/// Sends a request to the route's targets in turn until one answers.
pub(crate) async fn send<'a>(
    route: &'a RouteSettings,
    targets: &Targets,
    clients: &HttpClients,
    outgoing: Outgoing<'_>,
) -> Result<Answered<'a>, HttpError> {
    let Outgoing {
        method,
        shaped,
        mut body,
        timeout,
        affinity,
        request_id,
    } = outgoing;
    // A body-less request can go to every target; one with a body only until it is sent.
    let repeatable = body.is_none();
    let mut last = HttpError::Unreachable;
    let deadline = tokio::time::Instant::now() + timeout;
    for i in targets.in_order(affinity) {
        let (Some(target), Some(pool)) = (route.targets.get(i), clients.pools.get(i)) else {
            continue;
        };
        let Some(this_body) = body.take().or_else(|| repeatable.then(empty_body)) else {
            // The body went to a target that failed it: it cannot be sent again.
            break;
        };
        let mut request = match request_for(method, target, shaped, this_body) {
            Ok(request) => request,
            Err(error) => return Err(HttpError::Failed(error.into())),
        };
        // An idle connection the upstream closed as it was taken gives the request back
        // unsent: it goes again on a new connection.
        let mut fresh = false;
        loop {
            let connection = match pool.checkout() {
                Some(connection) => connection,
                None => {
                    fresh = true;
                    match tokio::time::timeout_at(deadline, pool.connect()).await {
                        Ok(Ok(connection)) => connection,
                        Ok(Err(error)) => {
                            tracing::warn!(request_id = %request_id, upstream = %target.url, %error, "upstream connect failed");
                            targets.mark_down(i, route.upstream_cooldown);
                            last = HttpError::Unreachable;
                            // The request (and its body) was not sent: the next target gets it.
                            body = Some(request.into_body());
                            break;
                        }
                        Err(_) => return Err(HttpError::Timeout),
                    }
                }
            };
            match tokio::time::timeout_at(deadline, exchange(connection, request)).await {
                Ok(Ok((response, connection))) => {
                    targets.mark_up(i);
                    return Ok(Answered {
                        response,
                        url: &target.url,
                        connection,
                    });
                }
                Ok(Err(Unanswered::Unsent(unsent))) if !fresh => request = *unsent,
                Ok(Err(Unanswered::Unsent(_))) => {
                    return Err(HttpError::Failed(
                        "a new connection refused the request".into(),
                    ));
                }
                Ok(Err(Unanswered::Failed(error))) => return Err(HttpError::Failed(error)),
                Err(_) => return Err(HttpError::Timeout),
            }
        }
    }
    Err(last)
}

/// Why a request sent on one connection got no response.
enum Unanswered {
    /// The connection could not take it (the upstream had closed it): it was not sent.
    Unsent(Box<Request<UpstreamBody>>),
    Failed(BoxError),
}

/// Sends `request` on `connection`, driving the connection until the response head arrives.
async fn exchange(
    mut connection: UpstreamConnection,
    request: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, UpstreamConnection), Unanswered> {
    let mut response = pin!(connection.sender.try_send_request(request));
    let answered = poll_fn(|cx| {
        // The connection first: it writes the request and reads the head.
        let ended = connection.poll_drive(cx).is_ready();
        match response.as_mut().poll(cx) {
            Poll::Ready(Ok(response)) => Poll::Ready(Ok(response)),
            Poll::Ready(Err(mut failed)) => Poll::Ready(Err(match failed.take_message() {
                Some(unsent) => Unanswered::Unsent(Box::new(unsent)),
                None => Unanswered::Failed(failed.into_error().into()),
            })),
            // hyper answers every request a connection took before the connection ends; a
            // connection that ended anyway is waited on no further.
            Poll::Pending if ended => Poll::Ready(Err(Unanswered::Failed(
                "the upstream closed the connection without answering".into(),
            ))),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    answered.map(|response| (response, connection))
}

fn empty_body() -> UpstreamBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn request_for(
    method: &Method,
    target: &TargetSettings,
    shaped: &ShapedRequest,
    body: UpstreamBody,
) -> Result<Request<UpstreamBody>, http::Error> {
    // Origin form, with the target in Host (the client's Host named the edge).
    let path_and_query = shaped.for_target(target).path_and_query;
    let mut request = Request::builder()
        .method(method.clone())
        .uri(path_and_query)
        .header(http::header::HOST, target.authority.as_str());
    if let Some(headers) = request.headers_mut() {
        headers.reserve(shaped.headers().len());
        for (name, value) in shaped.headers() {
            headers.append(name.clone(), value.clone());
        }
    }
    request.body(body)
}
