//! Plain HTTP to a route's targets: keep-alive HTTP/1.1 connections per target
//! ([`super::pool`], spoken by [`super::h1`]), and the next target tried when a request can be
//! sent again.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::Method;

use super::h1::{BoxError, H1Error, ResponseHead, UpstreamBody};
use super::pool::{Pool, Pooled, sweep_while_alive};
use super::targets::Targets;
use crate::config::settings::RouteSettings;
use crate::deadline::LazyDeadline;
use crate::forward::ShapedRequest;

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
    /// one cannot be reached. With its length when the client said it.
    pub(crate) body: Option<(UpstreamBody, Option<u64>)>,
    /// How long the request may go without progress: its body not taken, or, once it is
    /// sent, its response head not come.
    pub(crate) timeout: Duration,
    pub(crate) affinity: Option<u64>,
    pub(crate) request_id: &'a str,
}

/// The upstream's response head, which target sent it, and the connection its body comes on.
pub(crate) struct Answered<'a> {
    pub(crate) head: ResponseHead,
    pub(crate) url: &'a str,
    pub(crate) connection: Pooled,
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
    for i in targets.in_order(affinity) {
        let (Some(target), Some(pool)) = (route.targets.get(i), clients.pools.get(i)) else {
            continue;
        };
        let request = shaped.for_target(target);
        // A connection that served requests before may have been closed by the upstream as it
        // was taken; a request that can be sent again (idempotent, without a body) that got no
        // answer on it goes again on a new one, as nginx does.
        let mut connection = pool.checkout();
        loop {
            let mut fresh = match connection.take() {
                Some(reused) => reused,
                // Within the route's connect timeout.
                None => match pool.connect().await {
                    Ok(fresh) => fresh,
                    Err(error) => {
                        tracing::warn!(request_id = %request_id, upstream = %target.url, %error, "upstream connect failed");
                        targets.mark_down(i, route.upstream_cooldown);
                        // Nothing was sent: the next target gets the request, body and all.
                        break;
                    }
                },
            };
            let reused = fresh.used;
            let sent_body = body.take();
            let had_body = sent_body.is_some();
            fresh.connection.start(
                method,
                &request.path_and_query,
                &target.authority,
                request.headers,
                sent_body,
            );
            match response_head(&mut fresh, timeout).await {
                Some(Ok(head)) => {
                    targets.mark_up(i);
                    return Ok(Answered {
                        head,
                        url: &target.url,
                        connection: fresh,
                    });
                }
                Some(Err(H1Error::ClosedBeforeAnswer))
                    if reused && !had_body && method.is_idempotent() =>
                {
                    continue;
                }
                Some(Err(error)) => return Err(HttpError::Failed(Box::new(error))),
                None => return Err(HttpError::Timeout),
            }
        }
    }
    Err(HttpError::Unreachable)
}

/// Sends the request queued on `pooled` and waits for its response head; `None` when the
/// exchange made no progress for `timeout`. An upload is timed by its progress, not as a whole:
/// the deadline moves whenever the upstream took some of the request.
async fn response_head(
    pooled: &mut Pooled,
    timeout: Duration,
) -> Option<Result<ResponseHead, H1Error>> {
    let due = tokio::time::Instant::now() + timeout;
    let deadline = match &mut pooled.head_deadline {
        Some(deadline) => {
            deadline.set(due);
            deadline
        }
        None => pooled.head_deadline.insert(LazyDeadline::new(due)),
    };
    let connection = &mut pooled.connection;
    let mut written = None;
    poll_fn(|cx| {
        if let Poll::Ready(answer) = connection.poll_head(cx) {
            return Poll::Ready(Some(answer));
        }
        let now_written = connection.written();
        if written.is_some_and(|before| before != now_written) {
            deadline.set(tokio::time::Instant::now() + timeout);
        }
        written = Some(now_written);
        deadline.poll_passed(cx).map(|()| None)
    })
    .await
}
