//! Plain HTTP to a route's targets: a pool of keep-alive HTTP/1.1 connections per target
//! (hyper-util's client), opened like a WebSocket upstream's (TCP, and TLS for `wss://`
//! targets), and the next target tried when a request can be sent again.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::targets::Targets;
use super::websocket::open;
use crate::config::settings::{RouteSettings, TargetSettings};
use crate::forward::ShapedRequest;
use crate::ws::io::Io;

/// Errors a body passed through may end with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body on its way upstream.
pub(crate) type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// Idle upstream connections are closed after this: below the shortest keep-alive that common
/// upstreams keep (Node's 5 s), so that the edge never sends on a connection the upstream is
/// closing at that moment.
const POOL_IDLE: Duration = Duration::from_secs(4);
/// Idle connections kept per target.
const POOL_MAX_IDLE: usize = 32;

/// The pools of one route, one per target, in the order of its targets.
pub(crate) struct HttpClients {
    clients: Box<[Client<Connector, UpstreamBody>]>,
}

impl HttpClients {
    pub(crate) fn new(route: &RouteSettings) -> Self {
        let clients = route
            .targets
            .iter()
            .map(|target| {
                let connector = Connector {
                    target: Arc::new(target.clone()),
                    timeout: route.connect_timeout,
                };
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(POOL_IDLE)
                    .pool_max_idle_per_host(POOL_MAX_IDLE)
                    .build(connector)
            })
            .collect();
        Self { clients }
    }
}

/// Opens a connection to one target, whatever URI the client asks for.
#[derive(Clone)]
struct Connector {
    target: Arc<TargetSettings>,
    timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<Stream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (target, timeout) = (self.target.clone(), self.timeout);
        Box::pin(async move {
            let io = tokio::time::timeout(timeout, open(&target))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            Ok(TokioIo::new(Stream(io)))
        })
    }
}

/// An upstream connection as hyper-util's client keeps it.
struct Stream(Io);

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
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

/// The upstream's response, and which target sent it.
pub(crate) struct Answered<'a> {
    pub(crate) response: Response<Incoming>,
    pub(crate) url: &'a str,
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
    let repeatable = body.is_none();
    let mut last = HttpError::Unreachable;
    for i in targets.in_order(affinity) {
        let (Some(target), Some(client)) = (route.targets.get(i), clients.clients.get(i)) else {
            continue;
        };
        let Some(body) = body.take().or_else(|| repeatable.then(empty_body)) else {
            // The body went to a target that could not be reached: it cannot be sent again.
            break;
        };
        let request = match request_for(method, target, shaped, body) {
            Ok(request) => request,
            Err(error) => return Err(HttpError::Failed(error.into())),
        };
        match tokio::time::timeout(timeout, client.request(request)).await {
            Ok(Ok(response)) => {
                targets.mark_up(i);
                return Ok(Answered {
                    response,
                    url: &target.url,
                });
            }
            Ok(Err(error)) if error.is_connect() => {
                tracing::warn!(request_id = %request_id, upstream = %target.url, %error, "upstream connect failed");
                targets.mark_down(i, route.upstream_cooldown);
                last = HttpError::Unreachable;
            }
            Ok(Err(error)) => return Err(HttpError::Failed(error.into())),
            Err(_) => return Err(HttpError::Timeout),
        }
    }
    Err(last)
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
    let scheme = if target.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let path_and_query = shaped.for_target(target).path_and_query;
    let mut request = Request::builder()
        .method(method.clone())
        .uri(format!("{scheme}://{}{path_and_query}", target.authority));
    if let Some(headers) = request.headers_mut() {
        headers.reserve(shaped.headers().len());
        for (name, value) in shaped.headers() {
            headers.append(name.clone(), value.clone());
        }
    }
    request.body(body)
}
