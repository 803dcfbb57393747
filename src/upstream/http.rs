//! Plain HTTP to a route's targets: keep-alive HTTP/1.1 connections per target
//! ([`super::pool`], spoken by [`super::h1`]), and the next target tried when a request can be
//! sent again.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use super::h1::{BoxError, H1Error, ResponseHead, UpstreamBody};
use super::pool::{Pool, Pooled, sweep_while_alive};
use super::targets::Targets;
use crate::config::settings::RouteSettings;
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
    /// How long to wait for the response head.
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
    let deadline = tokio::time::Instant::now() + timeout;
    for i in targets.in_order(affinity) {
        let (Some(target), Some(pool)) = (route.targets.get(i), clients.pools.get(i)) else {
            continue;
        };
        let request = shaped.for_target(target);
        // A connection that served requests before may have been closed by the upstream as it
        // was taken; a request without a body that got no answer on it goes again on a new one.
        let mut connection = pool.checkout();
        loop {
            let mut fresh = match connection.take() {
                Some(reused) => reused,
                None => match tokio::time::timeout_at(deadline, pool.connect()).await {
                    Ok(Ok(fresh)) => fresh,
                    Ok(Err(error)) => {
                        tracing::warn!(request_id = %request_id, upstream = %target.url, %error, "upstream connect failed");
                        targets.mark_down(i, route.upstream_cooldown);
                        // Nothing was sent: the next target gets the request, body and all.
                        break;
                    }
                    Err(_) => return Err(HttpError::Timeout),
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
            let answered =
                tokio::time::timeout_at(deadline, poll_fn(|cx| fresh.connection.poll_head(cx)))
                    .await;
            match answered {
                Ok(Ok(head)) => {
                    targets.mark_up(i);
                    return Ok(Answered {
                        head,
                        url: &target.url,
                        connection: fresh,
                    });
                }
                Ok(Err(H1Error::ClosedBeforeAnswer)) if reused && !had_body => continue,
                Ok(Err(error)) => return Err(HttpError::Failed(Box::new(error))),
                Err(_) => return Err(HttpError::Timeout),
            }
        }
    }
    Err(HttpError::Unreachable)
}
