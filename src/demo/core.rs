//! The demo's chat core: one HTTP server, as a chat service has one, that upgrades
//! `/ws/chat` to a WebSocket streaming replies word by word, answers `GET /api/whoami` (REST)
//! and streams the same reply as Server-Sent Events on `GET /api/stream`. It trusts the
//! identity headers the edge injects, which is the point of the demo.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::channel::{Channel, Sender};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// The reply the core streams, with the user's name in it.
pub(super) const REPLY: &str = "Hello {user}! This answer is streamed word by word by the chat \
core, and every word crossed wsedge, which checked your token and told the core who you are.";

/// Time between two words: slow enough to watch them arrive.
const WORD_GAP: Duration = Duration::from_millis(40);

type CoreBody = Either<Full<Bytes>, Channel<Bytes, Infallible>>;

/// Serves the core on `listener`; `websockets` counts the WebSocket sessions it accepts.
pub(super) async fn serve(listener: TcpListener, websockets: Arc<AtomicUsize>) {
    while let Ok((stream, _)) = listener.accept().await {
        let websockets = websockets.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let websockets = websockets.clone();
                async move { Ok::<_, Infallible>(handle(request, &websockets)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn handle(request: Request<Incoming>, websockets: &Arc<AtomicUsize>) -> Response<CoreBody> {
    let identity = Identity::of(request.headers());
    match request.uri().path() {
        "/ws/chat" => upgrade(request, identity, websockets),
        "/api/whoami" => json_response(
            StatusCode::OK,
            json!({
                "user": identity.user,
                "tenant": identity.tenant,
                "token_seen": request.headers().contains_key(header::AUTHORIZATION)
                    || request.uri().query().is_some_and(|q| q.contains("token=")),
            }),
        ),
        "/api/stream" => sse(&identity.user),
        _ => json_response(StatusCode::NOT_FOUND, json!({ "error": "not_found" })),
    }
}

/// Who the edge says the caller is.
struct Identity {
    user: String,
    tenant: Option<String>,
    conversation: Option<String>,
}

impl Identity {
    fn of(headers: &HeaderMap) -> Self {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Identity {
            user: header("x-user-id").unwrap_or_else(|| "stranger".to_owned()),
            tenant: header("x-tenant-id"),
            conversation: header("x-conversation-id"),
        }
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<CoreBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The reply as Server-Sent Events: one `token` event per word, then `done`.
fn sse(user: &str) -> Response<CoreBody> {
    let (sender, body) = Channel::new(4);
    let mut response = Response::new(Either::Right(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    tokio::spawn(stream_events(sender, REPLY.replace("{user}", user)));
    response
}

async fn stream_events(mut sender: Sender<Bytes, Infallible>, reply: String) {
    for word in reply.split_inclusive(' ') {
        let event = format!("event: token\ndata: {}\n\n", json!({ "text": word }));
        if sender.send_data(Bytes::from(event)).await.is_err() {
            return;
        }
        tokio::time::sleep(WORD_GAP).await;
    }
    let _ = sender
        .send_data(Bytes::from_static(b"event: done\ndata: {}\n\n"))
        .await;
}

fn upgrade(
    mut request: Request<Incoming>,
    identity: Identity,
    websockets: &Arc<AtomicUsize>,
) -> Response<CoreBody> {
    let Some(key) = request.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return json_response(
            StatusCode::UPGRADE_REQUIRED,
            json!({ "error": "websocket_only" }),
        );
    };
    websockets.fetch_add(1, Ordering::SeqCst);
    let upgrading = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrading.await {
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            let _ = chat_session(ws, identity).await;
        }
    });
    let mut response = Response::new(Either::Left(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// One WebSocket session: greets with the identity the edge injected, then answers each
/// message with the reply streamed one word at a time.
async fn chat_session<S>(ws: WebSocketStream<S>, identity: Identity) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = ws.split();
    let hello = json!({
        "type": "hello",
        "identity": {
            "user": identity.user,
            "tenant": identity.tenant,
            "conversation": identity.conversation,
        },
    });
    tx.send(Message::text(hello.to_string())).await?;
    while let Some(message) = rx.next().await {
        match message? {
            Message::Text(_) => {
                for word in REPLY.replace("{user}", &identity.user).split_inclusive(' ') {
                    tx.send(Message::text(
                        json!({ "type": "token", "text": word }).to_string(),
                    ))
                    .await?;
                    tokio::time::sleep(WORD_GAP).await;
                }
                tx.send(Message::text(json!({ "type": "done" }).to_string()))
                    .await?;
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    Ok(())
}
